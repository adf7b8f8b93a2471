//! `ocr-patch hook install / uninstall / status`: the `.pth` file that starts the import hook
//! (`python/ocr_patch/hook.py`) in every interpreter of one Python environment.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::{print_json, Exit, OutputArgs};

pub const PTH_NAME: &str = "ocr_patch_hook.pth";

/// The line site.py executes at start-up: a failure never stops the interpreter.
pub const PTH_LINE: &str = "import sys; exec(\"try:\\n import ocr_patch.hook as _h; _h.install()\\nexcept Exception as _e:\\n sys.stderr.write('ocr-patch: hook not started: %s\\\\n' % (_e,))\")\n";

/// Manage the runtime import hook in a Python environment: a `.pth` file in its site-packages
/// that patches DeepSeek-OCR's remote code the moment Python first opens it (the `ocr_patch`
/// Python package must be installed there: `just install` does both).
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct HookArgs {
    #[command(subcommand)]
    pub action: HookAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum HookAction {
    /// Write the `.pth` file (idempotent)
    Install(HookTarget),
    /// Remove the `.pth` file (idempotent)
    Uninstall(HookTarget),
    /// Say whether the hook is installed and starts in a fresh interpreter
    Status(HookTarget),
}

#[derive(Debug, Clone, Args)]
pub struct HookTarget {
    /// The Python whose environment gets the hook (its site-packages is asked of it)
    #[arg(long, value_name = "PATH", default_value = "python3")]
    pub python: PathBuf,

    /// Use this site-packages folder instead of asking the interpreter
    #[arg(long, value_name = "DIR")]
    pub site_packages: Option<PathBuf>,

    #[command(flatten)]
    pub out: OutputArgs,
}

impl HookArgs {
    pub fn json(&self) -> bool {
        match &self.action {
            HookAction::Install(t) | HookAction::Uninstall(t) | HookAction::Status(t) => t.out.json,
        }
    }
}

fn python_output(python: &Path, code: &str) -> anyhow::Result<std::process::Output> {
    Command::new(python)
        .args(["-c", code])
        .env("OCR_PATCH_DISABLE", "1")
        .output()
        .with_context(|| format!("{}: cannot run this Python; pass --python PATH", python.display()))
}

fn site_packages(t: &HookTarget) -> anyhow::Result<PathBuf> {
    if let Some(d) = &t.site_packages {
        return Ok(d.clone());
    }
    let out = python_output(&t.python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")?;
    if !out.status.success() {
        anyhow::bail!("{}: cannot ask it for its site-packages ({}); pass --site-packages DIR", t.python.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[derive(Debug, Serialize)]
struct Status {
    python: PathBuf,
    site_packages: PathBuf,
    pth: PathBuf,
    pth_installed: bool,
    /// `import ocr_patch._native` works in that environment.
    package: bool,
    package_version: Option<String>,
    /// A fresh interpreter has the hook running.
    active: bool,
}

fn status(t: &HookTarget) -> anyhow::Result<Status> {
    let site = site_packages(t)?;
    let pth = site.join(PTH_NAME);
    let probe = Command::new(&t.python)
        .args(["-c", "import ocr_patch, ocr_patch._native as n, ocr_patch.hook as h; print(n.__version__, h.active())"])
        .output()
        .with_context(|| format!("{}: cannot run this Python; pass --python PATH", t.python.display()))?;
    let text = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    let mut parts = text.split_whitespace();
    let version = probe.status.success().then(|| parts.next().map(str::to_string)).flatten();
    let active = probe.status.success() && parts.next() == Some("True");
    Ok(Status { python: t.python.clone(), site_packages: site, pth_installed: pth.is_file(), pth, package: version.is_some(), package_version: version, active })
}

fn write_pth(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".ocr-patch-tmp-").tempfile_in(dir).with_context(|| format!("{}: cannot write here; run as the environment's owner", dir.display()))?;
    std::io::Write::write_all(&mut tmp, PTH_LINE.as_bytes())?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path).map_err(|e| e.error).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

pub fn run(args: HookArgs) -> anyhow::Result<Exit> {
    match args.action {
        HookAction::Install(t) => {
            let before = status(&t)?;
            if !before.package {
                anyhow::bail!(
                    "{}: the `ocr_patch` Python package is not installed for this Python; install it first (`just install`, or `{} -m pip install target/wheels/ocr_patch-*.whl`)",
                    t.python.display(),
                    t.python.display()
                );
            }
            let changed = std::fs::read_to_string(&before.pth).map_or(true, |s| s != PTH_LINE);
            if changed {
                write_pth(&before.pth)?;
            }
            let after = status(&t)?;
            if !after.active {
                anyhow::bail!("{}: written, but a fresh `{}` does not start the hook; check that this folder is a site-packages of that Python (or run `ocr-patch hook status`)", after.pth.display(), t.python.display());
            }
            report(&t, &after, if changed { "installed" } else { "already installed" })
        }
        HookAction::Uninstall(t) => {
            let site = site_packages(&t)?;
            let pth = site.join(PTH_NAME);
            let existed = pth.exists();
            if existed {
                std::fs::remove_file(&pth).with_context(|| format!("{}: cannot remove; run as the environment's owner", pth.display()))?;
            }
            if t.out.json {
                print_json(&serde_json::json!({ "command": "hook uninstall", "pth": pth, "removed": existed }))?;
            } else {
                println!("{} {}", if existed { "removed" } else { "not installed:" }, pth.display());
            }
            Ok(Exit::Done)
        }
        HookAction::Status(t) => {
            let s = status(&t)?;
            let word = match (s.pth_installed, s.active) {
                (true, true) => "installed and active",
                (true, false) => "installed but not active (is the ocr_patch package installed?)",
                (false, _) => "not installed",
            };
            report(&t, &s, word)?;
            Ok(if s.active { Exit::Done } else { Exit::Pending })
        }
    }
}

fn report(t: &HookTarget, s: &Status, word: &str) -> anyhow::Result<Exit> {
    if t.out.json {
        print_json(&serde_json::json!({ "command": "hook", "state": word, "status": s }))?;
    } else {
        println!("hook {word}: {} (python {}, package {})", s.pth.display(), s.python.display(), s.package_version.as_deref().unwrap_or("missing"));
    }
    Ok(Exit::Done)
}
