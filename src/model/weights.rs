//! Loading the checkpoint: every `*.safetensors` file of a folder, memory-mapped, served to the
//! blocks through a candle `VarBuilder` whose backend checks each tensor's presence, shape and
//! dtype and records a typed [`WeightsError`] instead of panicking.
//!
//! Owns: finding the files, the checks, converting bf16/f16/f32 to the dtype the model runs in.
//! Does not own: tensor names (each block passes the checkpoint's own names to `vb.pp(...)`),
//! making synthetic weights (`synth.rs`, elsewhere).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{dir}: no .safetensors files found; point at the folder that holds the checkpoint")]
    NoFiles { dir: String },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a readable safetensors file: {message}")]
    Unreadable { path: String, message: String },
    #[error("tensor `{name}` is missing from the checkpoint; is this a DeepSeek-OCR checkpoint matching config.json?")]
    Missing { name: String },
    #[error("tensor `{name}` has shape {found:?}, the model expects {expected:?}; does config.json match the weights?")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` is stored as {found}; only bf16, f16 and f32 are supported")]
    Dtype { name: String, found: String },
    #[error("tensor `{name}`: {message}")]
    Load { name: String, message: String },
}

/// The `*.safetensors` files of `dir`, sorted (shards first to last).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let rd = std::fs::read_dir(dir).map_err(|e| WeightsError::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| WeightsError::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(WeightsError::NoFiles {
            dir: dir.display().to_string(),
        });
    }
    Ok(files)
}

/// A checkpoint opened for reading. Cheap to clone.
#[derive(Clone)]
pub struct Weights {
    st: Arc<MmapedSafetensors>,
    /// The first error a block ran into; candle's own error type cannot carry ours.
    first_error: Arc<Mutex<Option<WeightsError>>>,
}

impl Weights {
    /// Memory-maps every `*.safetensors` file in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, WeightsError> {
        Self::open_files(&safetensors_files(dir)?)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self, WeightsError> {
        for f in files {
            if let Err(e) = std::fs::metadata(f) {
                return Err(WeightsError::Io {
                    path: f.display().to_string(),
                    source: e,
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every safetensors reader we assume nobody
        // truncates them while the model is loaded.
        let st =
            unsafe { MmapedSafetensors::multi(files) }.map_err(|e| WeightsError::Unreadable {
                path: files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                message: e.to_string(),
            })?;
        Ok(Self {
            st: Arc::new(st),
            first_error: Arc::new(Mutex::new(None)),
        })
    }

    /// A `VarBuilder` rooted at the checkpoint's top (names like `model.layers.0...`) that
    /// converts every tensor to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self.clone());
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// Takes the typed error recorded by a failed load, if any.
    pub fn take_error(&self) -> Option<WeightsError> {
        self.first_error.lock().ok().and_then(|mut g| g.take())
    }

    /// Names, dtypes and shapes of every tensor (for `inspect`-like tools and tests).
    pub fn tensors(&self) -> Vec<(String, String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, format!("{:?}", t.dtype()), t.shape().to_vec()))
            .collect();
        v.sort();
        v
    }

    fn fail(&self, e: WeightsError) -> candle_core::Error {
        let msg = e.to_string();
        if let Ok(mut g) = self.first_error.lock() {
            if g.is_none() {
                *g = Some(e);
            }
        }
        candle_core::Error::Msg(msg)
    }

    fn load_checked(
        &self,
        expected: Option<&Shape>,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        use safetensors::Dtype as S;
        let view = match self.st.get(name) {
            Ok(v) => v,
            Err(_) => return Err(self.fail(WeightsError::Missing { name: name.into() })),
        };
        if !matches!(view.dtype(), S::BF16 | S::F16 | S::F32) {
            return Err(self.fail(WeightsError::Dtype {
                name: name.into(),
                found: format!("{:?}", view.dtype()),
            }));
        }
        if let Some(expected) = expected {
            if view.shape() != expected.dims() {
                return Err(self.fail(WeightsError::Shape {
                    name: name.into(),
                    expected: expected.dims().to_vec(),
                    found: view.shape().to_vec(),
                }));
            }
        }
        let t = self
            .st
            .load(name, dev)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| {
                self.fail(WeightsError::Load {
                    name: name.into(),
                    message: e.to_string(),
                })
            })?;
        Ok(t)
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load_checked(Some(&s), name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_checked(None, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn write(dir: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    }

    #[test]
    fn loads_bf16_as_f32_and_reports_missing_shape_and_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1.5f32, -2.0], [0.25, 4.0]], &dev).unwrap();
        write(
            dir.path(),
            &[
                ("a.weight", a.to_dtype(DType::BF16).unwrap()),
                ("ids", Tensor::new(&[1i64, 2], &dev).unwrap()),
            ],
        );
        let w = Weights::open_dir(dir.path()).unwrap();
        let vb = w.var_builder(DType::F32, &dev);
        let got = vb.pp("a").get((2, 2), "weight").unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());

        assert!(vb.get(3, "b").is_err());
        assert!(matches!(w.take_error(), Some(WeightsError::Missing { name }) if name == "b"));

        assert!(vb.pp("a").get((2, 3), "weight").is_err());
        let e = w.take_error().unwrap();
        assert!(matches!(&e, WeightsError::Shape { found, .. } if found == &vec![2, 2]));
        assert!(
            e.to_string()
                .starts_with("tensor `a.weight` has shape [2, 2]"),
            "{e}"
        );

        assert!(vb.get(2, "ids").is_err());
        assert!(matches!(w.take_error(), Some(WeightsError::Dtype { .. })));
    }

    #[test]
    fn empty_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Weights::open_dir(dir.path()).err().unwrap();
        assert!(e.to_string().contains("no .safetensors files"), "{e}");
    }
}
