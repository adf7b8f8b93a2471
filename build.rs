//! Compiles `kernels/*.cu` to PTX with nvcc when the `cuda` feature is on; does nothing otherwise,
//! so CPU builds (CI) need no CUDA toolkit.
//!
//! Each `kernels/<op>.cu` becomes `$OUT_DIR/<op>.ptx`, and `<op>.trace.ptx` with the in-graph
//! timeline's probes (`-DOCR_TRACE`, for `ocr-patch bench --profile trace`), embedded by `src/model/kernels/` with
//! `include_str!`. nvcc comes from `CUDA_ROOT`/`PATH` (see `../shared/tools/cuda-build-env.sh`);
//! the target architecture from `CUDA_COMPUTE_CAP` (default 90, Hopper).
//!
//! With the `cutlass` feature also `kernels/cutlass/*.cu`: CUTLASS GEMMs with fused epilogues,
//! host and device code compiled by nvcc for `sm_{cap}a` into one static library linked into
//! the crate with the static CUDA runtime (their host side sets up TMA descriptors and launches).
//! CUTLASS's headers come from `CUTLASS_DIR` (a CUTLASS checkout, or the `source` folder of the
//! `nvidia-cutlass` wheel) or, unset, from python3's `cutlass_library` (`pip install nvidia-cutlass`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUTLASS_DIR");
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
    if std::env::var_os("CARGO_FEATURE_CUTLASS").is_some() {
        cutlass(&nvcc, &cap, &out);
    }
}

/// Where CUTLASS's `include` and `tools/util/include` are (see the module doc).
fn cutlass_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CUTLASS_DIR") {
        return PathBuf::from(dir);
    }
    let found = Command::new("python3")
        .args(["-c", "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    found.unwrap_or_else(|| {
        panic!("the `cutlass` feature needs CUTLASS's headers: `pip install nvidia-cutlass`, or set CUTLASS_DIR to a CUTLASS checkout")
    })
}

/// `kernels/cutlass/*.cu` into `libocr_cutlass.a`, linked with the static CUDA runtime.
fn cutlass(nvcc: &std::path::Path, cap: &str, out: &std::path::Path) {
    let dir = cutlass_dir();
    let include = dir.join("include");
    assert!(
        include.join("cutlass").join("cutlass.h").is_file(),
        "{}: no cutlass/cutlass.h; CUTLASS_DIR must hold CUTLASS's include/ and tools/util/include/",
        include.display()
    );
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels/cutlass")
        .expect("kernels/cutlass/ exists next to Cargo.toml")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    // the folder: its .cu files and the headers they include (CUTLASS's FMHA in fmha/)
    println!("cargo:rerun-if-changed=kernels/cutlass");
    let mut objects = Vec::new();
    for cu in &sources {
        let stem = cu.file_stem().expect("a .cu file has a stem").to_string_lossy().into_owned();
        let obj = out.join(format!("cutlass_{stem}.o"));
        // NDEBUG: CUTLASS's device asserts are calls, which serialise the wgmma pipeline
        let status = Command::new(nvcc)
            .args(["-c", "-O3", "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"])
            .arg(format!("-arch=sm_{cap}a"))
            .arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(dir.join("tools").join("util").join("include"))
            .arg("-o")
            .arg(&obj)
            .arg(cu)
            .status()
            .unwrap_or_else(|e| panic!("cannot run nvcc ({}): {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", cu.display());
        objects.push(obj);
    }
    let lib = out.join("libocr_cutlass.a");
    let _ = std::fs::remove_file(&lib);
    let status = Command::new("ar").arg("crs").arg(&lib).args(&objects).status().expect("cannot run ar");
    assert!(status.success(), "ar failed on {}", lib.display());
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=ocr_cutlass");
    // the static CUDA runtime: the toolkit's lib64, or the PyPI layout's lib
    let root = nvcc.parent().and_then(|b| b.parent()).map(PathBuf::from).unwrap_or_default();
    for sub in ["lib64", "lib", "targets/x86_64-linux/lib"] {
        if root.join(sub).join("libcudart_static.a").is_file() {
            println!("cargo:rustc-link-search=native={}", root.join(sub).display());
        }
    }
    println!("cargo:rustc-link-lib=static=cudart_static");
    for lib in ["stdc++", "dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
