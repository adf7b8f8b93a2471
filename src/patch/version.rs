//! Release numbers of transformers and the ranges a rule concerns.
//!
//! Owns: parsing `4.57.1`, `5.0.0.dev0`, `4.48.0rc1` into comparable triples, and ranges
//! written like `>=4.48.0, <4.48.3`. Touches nothing else.

use std::fmt;
use std::str::FromStr;

/// A transformers release: major, minor, patch (pre-release tags are ignored: `5.0.0rc1` counts as 5.0.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    #[error("`{0}` is not a version; expected something like 4.57.1")]
    Bad(String),
    #[error("`{0}` is not a version range; expected something like \">=4.48.0, <4.48.3\"")]
    BadRange(String),
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Version { major, minor, patch }
    }

    pub fn parse(text: &str) -> Result<Self, VersionError> {
        let bad = || VersionError::Bad(text.to_string());
        let mut parts = text.trim().splitn(3, '.');
        let mut next = |required: bool| -> Result<u32, VersionError> {
            match parts.next() {
                None if !required => Ok(0),
                None => Err(bad()),
                Some(p) => {
                    let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
                    match digits.parse() {
                        Ok(n) => Ok(n),
                        // `5.1.dev0`: a tag where the patch number would be.
                        Err(_) if !required => Ok(0),
                        Err(_) => Err(bad()),
                    }
                }
            }
        };
        let major = next(true)?;
        let minor = next(true)?;
        let patch = next(false)?;
        Ok(Version { major, minor, patch })
    }
}

impl FromStr for Version {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::parse(s)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A conjunction of bounds, e.g. `>=4.48.0, <4.48.3`. An empty range matches every version.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VersionRange {
    bounds: Vec<(Op, Version)>,
    text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
}

impl VersionRange {
    pub fn parse(text: &str) -> Result<Self, VersionError> {
        let mut bounds = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (op, rest) = [(">=", Op::Ge), ("<=", Op::Le), ("==", Op::Eq), (">", Op::Gt), ("<", Op::Lt)]
                .iter()
                .find_map(|(p, op)| part.strip_prefix(p).map(|rest| (*op, rest)))
                .ok_or_else(|| VersionError::BadRange(text.to_string()))?;
            let v = Version::parse(rest).map_err(|_| VersionError::BadRange(text.to_string()))?;
            bounds.push((op, v));
        }
        Ok(VersionRange { bounds, text: text.trim().to_string() })
    }

    pub fn contains(&self, v: &Version) -> bool {
        self.bounds.iter().all(|(op, b)| match op {
            Op::Ge => v >= b,
            Op::Gt => v > b,
            Op::Le => v <= b,
            Op::Lt => v < b,
            Op::Eq => v == b,
        })
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            f.write_str("all releases")
        } else {
            f.write_str(&self.text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_and_prerelease_numbers() {
        assert_eq!(Version::parse("4.57.1").unwrap(), Version::new(4, 57, 1));
        assert_eq!(Version::parse("5.0.0rc1").unwrap(), Version::new(5, 0, 0));
        assert_eq!(Version::parse("5.1.dev0").unwrap(), Version::new(5, 1, 0));
        assert_eq!(Version::parse("5.3").unwrap(), Version::new(5, 3, 0));
        assert!(Version::parse("five").is_err());
        assert!(Version::parse("").is_err());
        assert!(Version::parse("4").is_err());
    }

    #[test]
    fn ranges_are_conjunctions() {
        let r = VersionRange::parse(">=4.48.0, <4.48.3").unwrap();
        assert!(r.contains(&Version::new(4, 48, 0)));
        assert!(r.contains(&Version::new(4, 48, 2)));
        assert!(!r.contains(&Version::new(4, 48, 3)));
        assert!(!r.contains(&Version::new(4, 47, 1)));
        assert!(VersionRange::parse("").unwrap().contains(&Version::new(1, 0, 0)));
        assert!(VersionRange::parse("~4.48").is_err());
    }
}
