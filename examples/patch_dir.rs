//! Development aid: patch every targeted file of a folder into another folder and print a
//! lock for them. `cargo run --example patch_dir -- IN_DIR OUT_DIR SOURCE`
use std::fs;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (input, output, source) = (&args[1], &args[2], &args[3]);
    let engine = ocr_patch::patch::Engine::embedded()?;
    fs::create_dir_all(output)?;
    let mut files = Vec::new();
    let mut names: Vec<_> = fs::read_dir(input)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect();
    names.sort();
    for name in names {
        let bytes = fs::read(format!("{input}/{name}"))?;
        if engine.targets(&name) {
            let rw = engine.rewrite(&name, &bytes)?;
            for (r, n) in &rw.matches {
                eprintln!("{name}: rule {} matched {n}", r.spec.id);
            }
            fs::write(format!("{output}/{name}"), &rw.bytes)?;
        } else {
            fs::write(format!("{output}/{name}"), &bytes)?;
        }
        files.push((name, bytes));
    }
    print!("{}", engine.lock_for(source, &files)?.to_toml());
    Ok(())
}
