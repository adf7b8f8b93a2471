//! `ocr-patch doctor`: what is in the caches, and what will break with this transformers.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::{nothing_found, print_json, progress, Exit, OutputArgs, ScanArgs};
use crate::cache::layout::Roots;
use crate::cache::ops::{self, FileStatus, TargetReport};
use crate::patch::Version;

/// Scan every DeepSeek-OCR remote-code folder in the caches and tell, for each file, whether it
/// is original, patched, outdated or unknown, and which known breakages the unpatched ones will
/// hit with the installed transformers (found with `python3 -c "import transformers"`, or given
/// with --transformers-version). Writes nothing; exits 0 unless the scan itself fails.
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub scan: ScanArgs,

    /// Check against this transformers version instead of the installed one (e.g. 4.57.1)
    #[arg(long, value_name = "X.Y.Z")]
    pub transformers_version: Option<String>,

    /// Python interpreter used to find the installed transformers
    #[arg(long, value_name = "PATH", default_value = "python3")]
    pub python: String,

    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Serialize)]
struct DoctorJson<'a> {
    command: &'static str,
    transformers: Option<String>,
    transformers_source: &'a str,
    roots: &'a Roots,
    problems: &'a [String],
    targets: &'a [TargetReport],
}

/// Asks `python` for `transformers.__version__`; `Err` says why not, in one line.
fn installed_transformers(python: &str) -> Result<String, String> {
    let mut child = Command::new(python)
        .args(["-c", "import transformers; print(transformers.__version__)"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run `{python}` ({e})"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{python}` took over 60s to import transformers"));
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| format!("`{python}` failed ({e})"))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !v.is_empty() {
        Ok(v)
    } else {
        Err(format!("transformers is not importable with `{python}`"))
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<Exit> {
    let engine = args.scan.engine()?;
    let (version_text, source, note) = match &args.transformers_version {
        Some(v) => (Some(v.clone()), "--transformers-version", None),
        None => match installed_transformers(&args.python) {
            Ok(v) => (Some(v), "python", None),
            Err(why) => (None, "none", Some(why)),
        },
    };
    let version = match &version_text {
        Some(v) => Some(Version::parse(v).map_err(|e| anyhow::anyhow!("transformers version {e} (from {source}); pass --transformers-version X.Y.Z"))?),
        None => None,
    };
    let roots = args.scan.roots();
    let targets = args.scan.targets(&roots, &|n| engine.targets(n))?;
    let pb = progress(args.out.json, "scanning");
    let (report, problems) = ops::doctor(&engine, &targets, version.as_ref(), &pb)?;
    pb.finish_and_clear();
    if args.out.json {
        print_json(&DoctorJson {
            command: "doctor",
            transformers: version_text,
            transformers_source: source,
            roots: &roots,
            problems: &problems,
            targets: &report.targets,
        })?;
        return Ok(Exit::Done);
    }
    match (&version_text, &note) {
        (Some(v), _) => println!("transformers {v} (from {source})"),
        (None, Some(why)) => println!("transformers: unknown ({why}); pass --transformers-version X to list breakages"),
        (None, None) => {}
    }
    if report.targets.is_empty() {
        println!("{}", nothing_found(&roots));
    }
    let (mut pending, mut patched) = (0, 0);
    for t in &report.targets {
        let id = match (&t.model, &t.revision) {
            (Some(m), Some(r)) => format!("{m}@{r}"),
            (Some(m), None) => m.clone(),
            _ => String::new(),
        };
        println!("{}  ({}{}{})", t.dir.display(), t.kind.label(), if id.is_empty() { "" } else { ", " }, id);
        for f in &t.files {
            let state = match f.status {
                FileStatus::Original => "original",
                FileStatus::Patched => "patched",
                FileStatus::Outdated => "outdated patch",
                FileStatus::Unknown => "unknown",
                FileStatus::Fork => "fork",
            };
            if matches!(f.status, FileStatus::Patched | FileStatus::Fork) {
                patched += 1;
            } else {
                pending += 1;
            }
            let hits = match &f.breakages {
                Some(h) if h.is_empty() => "  no known breakage".to_string(),
                Some(h) => format!(
                    "  will hit: {}",
                    h.iter().map(|b| format!("{} ({})", b.id, b.title)).collect::<Vec<_>>().join("; ")
                ),
                None => String::new(),
            };
            println!("  {:<32} {:<14}{}", f.file, state, hits);
        }
    }
    for p in &problems {
        println!("problem: {p}");
    }
    println!("doctor: {patched} patched, {pending} not patched, in {} folder{}", report.targets.len(), if report.targets.len() == 1 { "" } else { "s" });
    if pending > 0 {
        println!("run `ocr-patch apply` to patch them");
    }
    Ok(Exit::Done)
}
