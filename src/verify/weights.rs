//! Where the verifier's weights come from: the golden's synthetic weights regenerated in memory
//! (`ocrp-synth-v1`, its seed, bf16 then read as f32 exactly as the golden's run loaded them),
//! or a checkpoint folder (`--weights DIR`); and deliberate perturbations of them, to show that
//! a wrong model fails and where.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::model::synth::{self, TensorSpec};
use crate::model::Weights;

use super::VerifyError;
use sha2::Digest as _;

/// A change made to the model on purpose (tests, `--perturb`).
#[derive(Debug, Clone, PartialEq)]
pub enum Perturbation {
    /// Multiply one tensor by `factor` (`scale:NAME:FACTOR`).
    Scale { name: String, factor: f64 },
    /// Serve every tensor under prefix `a` from prefix `b` and back (`swap:A:B`), e.g. two SAM
    /// blocks or two decoder layers' attention.
    Swap { a: String, b: String },
    /// Leave `image_newline` out of the image's rows (`drop-image-newline`).
    DropImageNewline,
}

impl std::str::FromStr for Perturbation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["scale", name, f] => Ok(Self::Scale {
                name: name.to_string(),
                factor: f.parse().map_err(|_| format!("`{f}` is not a number"))?,
            }),
            ["swap", a, b] => Ok(Self::Swap { a: a.to_string(), b: b.to_string() }),
            ["drop-image-newline"] => Ok(Self::DropImageNewline),
            _ => Err(format!(
                "`{s}`: expected scale:TENSOR:FACTOR, swap:PREFIX_A:PREFIX_B or drop-image-newline"
            )),
        }
    }
}

/// The weights of one run.
#[derive(Clone)]
pub enum Source {
    /// `synth::plan(config)` generated on request, in `synth_dtype`, with `seed`.
    Synth {
        specs: Arc<HashMap<String, TensorSpec>>,
        seed: u64,
        dtype: synth::DType,
    },
    /// A checkpoint folder.
    Dir(Weights),
}

impl Source {
    pub fn synth(config: &serde_json::Value, seed: u64, dtype: synth::DType) -> Result<Self, VerifyError> {
        let specs = synth::plan(config).map_err(|e| VerifyError::Weights(e.to_string()))?;
        Ok(Self::Synth {
            specs: Arc::new(specs.into_iter().map(|s| (s.name.clone(), s)).collect()),
            seed,
            dtype,
        })
    }

    pub fn dir(dir: &Path) -> Result<Self, VerifyError> {
        Ok(Self::Dir(Weights::open_dir(dir).map_err(|e| VerifyError::Weights(e.to_string()))?))
    }

    /// A `VarBuilder` rooted at the checkpoint's top, perturbed as asked.
    pub fn var_builder(&self, perturb: &[Perturbation], dtype: DType, device: &Device) -> VarBuilder<'static> {
        let inner: Box<dyn SimpleBackend> = match self {
            Source::Synth { specs, seed, dtype } => Box::new(SynthBackend {
                specs: specs.clone(),
                seed: *seed,
                dtype: *dtype,
            }),
            Source::Dir(w) => Box::new(w.clone()),
        };
        let backend = Perturbed {
            inner,
            perturb: perturb.to_vec(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// The first weights error recorded while building (checkpoint folders only).
    pub fn take_error(&self) -> Option<String> {
        match self {
            Source::Dir(w) => w.take_error().map(|e| e.to_string()),
            Source::Synth { .. } => None,
        }
    }
}

/// `(seed, dtype, name, shape, init)` -> the generated tensor (f32, CPU).
type MemoKey = (u64, String, String, Vec<usize>, String);

fn memo_key(seed: u64, dtype: synth::DType, spec: &TensorSpec) -> MemoKey {
    (seed, dtype.to_string(), spec.name.clone(), spec.shape.clone(), format!("{:?}", spec.init))
}

/// Generated tensors are kept for the life of the process: the vision tower (400M values, the
/// bulk of the time) is the same for every config and case of a seed, so one `verify` run and
/// a test binary generate it once. Costs its size in memory (1.6 GB f32 at the real vision
/// sizes) for as long as the process runs.
fn memo() -> &'static Mutex<HashMap<MemoKey, Tensor>> {
    static MEMO: OnceLock<Mutex<HashMap<MemoKey, Tensor>>> = OnceLock::new();
    MEMO.get_or_init(Default::default)
}

/// Generates each tensor when the model asks for it (no file), memoised ([`memo`]).
struct SynthBackend {
    specs: Arc<HashMap<String, TensorSpec>>,
    seed: u64,
    dtype: synth::DType,
}

impl SimpleBackend for SynthBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "synthetic tensor `{name}` has shape {:?}, the model expects {:?}",
                t.shape().dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(spec) = self.specs.get(name) else {
            candle_core::bail!("tensor `{name}` is not in the synthetic plan of this config")
        };
        let key = memo_key(self.seed, self.dtype, spec);
        let cached = memo().lock().ok().and_then(|m| m.get(&key).cloned());
        let t = match cached {
            Some(t) => t,
            None => {
                // The golden's run stored bf16 and loaded it as float32: to_f32 is exact.
                let values = synth::generate(spec, self.seed, self.dtype).to_f32();
                let t = Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu)?;
                if let Ok(mut m) = memo().lock() {
                    m.insert(key, t.clone());
                }
                t
            }
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.specs.contains_key(name)
    }
}

struct Perturbed {
    inner: Box<dyn SimpleBackend>,
    perturb: Vec<Perturbation>,
}

impl Perturbed {
    fn rename(&self, name: &str) -> String {
        for p in &self.perturb {
            if let Perturbation::Swap { a, b } = p {
                for (from, to) in [(a, b), (b, a)] {
                    if let Some(rest) = name.strip_prefix(from.as_str()) {
                        if rest.is_empty() || rest.starts_with('.') {
                            return format!("{to}{rest}");
                        }
                    }
                }
            }
        }
        name.to_string()
    }

    fn scale(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let mut t = t;
        for p in &self.perturb {
            if let Perturbation::Scale { name: n, factor } = p {
                if n == name {
                    t = (t * *factor)?;
                }
            }
        }
        Ok(t)
    }
}

impl SimpleBackend for Perturbed {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get(s, &self.rename(name), h, dtype, dev)?;
        self.scale(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked(&self.rename(name), dtype, dev)?;
        self.scale(name, t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(&self.rename(name))
    }
}

/// What a golden's `weights.sha256` names for a checkpoint folder: with one `*.safetensors`
/// file, that file's sha256; with several (shards), the sha256 of the lines
/// `<sha256 of the file>  <file name>\n` in file-name order (`sha256sum`'s format).
pub fn dir_sha256(dir: &Path) -> Result<String, VerifyError> {
    let files = crate::model::weights::safetensors_files(dir).map_err(|e| VerifyError::Weights(e.to_string()))?;
    let mut lines = String::new();
    let mut single = None;
    for f in &files {
        let sha = file_sha256(f)?;
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        lines.push_str(&format!("{sha}  {name}\n"));
        single = Some(sha);
    }
    match (files.len(), single) {
        (1, Some(sha)) => Ok(sha),
        _ => Ok(hex::encode(sha2::Sha256::digest(lines.as_bytes()))),
    }
}

/// sha256 (hex) of one file, streamed.
pub fn file_sha256(path: &Path) -> Result<String, VerifyError> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| VerifyError::Weights(format!("{}: cannot read ({e})", path.display())))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 22];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| VerifyError::Weights(format!("{}: cannot read ({e})", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The sha256 of the synthetic checkpoint file `ocr-patch synth` writes for `config`, `seed`,
/// `dtype` (and writer `tool`), computed in memory once per process and arguments.
pub fn synth_sha256(config: &serde_json::Value, seed: u64, dtype: synth::DType, tool: Option<&str>) -> Result<String, VerifyError> {
    type Key = (String, u64, String, Option<String>);
    static MEMO: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    let key = (synth::config_sha256(config), seed, dtype.to_string(), tool.map(String::from));
    if let Some(s) = MEMO.get_or_init(Default::default).lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(s);
    }
    // One pass: each tensor is generated once (or taken from the memo), hashed, and kept in
    // the memo for the model that is built next.
    let sha = synth::file_sha256_with(config, seed, dtype, tool, |spec, buf| {
        let key = memo_key(seed, dtype, spec);
        let cached = memo().lock().ok().and_then(|m| m.get(&key).cloned());
        let values = cached.and_then(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok());
        match values {
            Some(v) if v.len() * dtype.size() == buf.len() => match dtype {
                synth::DType::Bf16 => {
                    for (dst, x) in buf.chunks_exact_mut(2).zip(v) {
                        dst.copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
                    }
                }
                synth::DType::F32 => {
                    for (dst, x) in buf.chunks_exact_mut(4).zip(v) {
                        dst.copy_from_slice(&x.to_le_bytes());
                    }
                }
            },
            _ => {
                synth::fill(spec, seed, dtype, buf);
                let data = synth::TensorData { dtype, shape: spec.shape.clone(), data: buf.to_vec() };
                if let Ok(t) = Tensor::from_vec(data.to_f32(), spec.shape.as_slice(), &Device::Cpu) {
                    if let Ok(mut m) = memo().lock() {
                        m.insert(key, t);
                    }
                }
            }
        }
    })
    .map_err(|e| VerifyError::Weights(e.to_string()))?;
    if let Ok(mut m) = MEMO.get_or_init(Default::default).lock() {
        m.insert(key, sha.clone());
    }
    Ok(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perturbations_parse() {
        assert_eq!(
            "scale:model.norm.weight:1.5".parse::<Perturbation>(),
            Ok(Perturbation::Scale { name: "model.norm.weight".into(), factor: 1.5 })
        );
        assert_eq!(
            "swap:a.0:a.1".parse::<Perturbation>(),
            Ok(Perturbation::Swap { a: "a.0".into(), b: "a.1".into() })
        );
        assert_eq!("drop-image-newline".parse::<Perturbation>(), Ok(Perturbation::DropImageNewline));
        assert!("flip".parse::<Perturbation>().is_err());
    }

    #[test]
    fn swap_renames_whole_path_components_only() {
        let p = Perturbed {
            inner: Box::new(SynthBackend { specs: Arc::new(HashMap::new()), seed: 1, dtype: synth::DType::Bf16 }),
            perturb: vec![Perturbation::Swap { a: "m.layers.1".into(), b: "m.layers.2".into() }],
        };
        assert_eq!(p.rename("m.layers.1.w"), "m.layers.2.w");
        assert_eq!(p.rename("m.layers.2.w"), "m.layers.1.w");
        assert_eq!(p.rename("m.layers.11.w"), "m.layers.11.w");
    }
}
