//! Compiles `kernels/*.cu` to PTX with nvcc when the `cuda` feature is on; does nothing otherwise,
//! so CPU builds (CI) need no CUDA toolkit.
//!
//! Each `kernels/<op>.cu` becomes `$OUT_DIR/<op>.ptx`, and `<op>.trace.ptx` with the in-graph
//! timeline's probes (`-DOCR_TRACE`, for `ocr-patch bench --profile trace`), embedded by `src/model/kernels/` with
//! `include_str!`. nvcc comes from `CUDA_ROOT`/`PATH` (see `../shared/tools/cuda-build-env.sh`);
//! the target architecture from `CUDA_COMPUTE_CAP` (default 90, Hopper).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = match std::env::var_os("CUDA_ROOT") {
        Some(root) => PathBuf::from(root).join("bin").join("nvcc"),
        None => PathBuf::from("nvcc"),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ exists next to Cargo.toml")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    // headers (`*.cuh`) too: an edit of one must rebuild the kernels that include it
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    for cu in files.iter().filter(|p| p.extension().is_some_and(|x| x == "cu")) {
        let stem = cu.file_stem().expect("a .cu file has a stem").to_string_lossy().into_owned();
        // the kernels, and the same with the timeline's probes (-DOCR_TRACE, see common.cuh)
        for (suffix, defines) in [("", &[][..]), (".trace", &["-DOCR_TRACE"][..])] {
            let ptx = out.join(format!("{stem}{suffix}.ptx"));
            let status = Command::new(&nvcc)
                .args(["--ptx", "-O3", "-std=c++17"])
                .arg(format!("-arch=compute_{cap}"))
                .args(defines)
                .arg("-Ikernels")
                .arg("-o")
                .arg(&ptx)
                .arg(cu)
                .status()
                .unwrap_or_else(|e| panic!("cannot run nvcc ({}): {e}; eval \"$(../shared/tools/cuda-build-env.sh)\" first", nvcc.display()));
            assert!(status.success(), "nvcc failed on {}", cu.display());
        }
    }
}
