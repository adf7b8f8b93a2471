//! Reading a golden file (`golden/README.md`): its header, its tensors, and the inputs it
//! describes (token ids, image mask, pixels rebuilt from the documented formula).
//!
//! Owns: the golden format (version 1). Does not run anything.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use super::VerifyError;

/// The golden format this build reads.
pub const FORMAT_VERSION: &str = "1";

/// `vision` (SAM, CLIP, projector of one case), `language` (one config on one case), or
/// `summary` (a GPU run kept small: greedy tokens, top-k logits per step, per-stage norms;
/// golden/gpu/README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Vision,
    Language,
    Summary,
}

/// A tensor of a golden, converted to a plain vector.
#[derive(Debug, Clone)]
pub struct GTensor {
    pub shape: Vec<usize>,
    pub data: GData,
}

#[derive(Debug, Clone)]
pub enum GData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

impl GTensor {
    pub fn f32(&self) -> Option<&[f32]> {
        match &self.data {
            GData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Integer tensors (ids, masks) as i64.
    pub fn ints(&self) -> Option<Vec<i64>> {
        match &self.data {
            GData::I64(v) => Some(v.clone()),
            GData::U8(v) => Some(v.iter().map(|&b| b as i64).collect()),
            GData::F32(_) => None,
        }
    }
}

/// The case a golden was made on (`case.*` of its header).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Case {
    pub name: String,
    /// Global view size (`case.base_size` with crops, `case.image_size` without).
    pub global_size: usize,
    /// `Some((tile size, width_crop_num, height_crop_num))` in crop mode.
    pub tiles: Option<(usize, usize, usize)>,
}

/// One golden file, read whole (they are a few MB).
#[derive(Debug, Clone)]
pub struct Golden {
    pub path: PathBuf,
    pub kind: Kind,
    pub meta: BTreeMap<String, String>,
    pub tensors: HashMap<String, GTensor>,
    pub case: Case,
    /// The config the golden was made with (canonical JSON as stored).
    pub config_json: String,
    pub config: serde_json::Value,
    /// `synth.seed` when the weights were synthetic.
    pub seed: Option<u64>,
}

impl Golden {
    /// Reads and checks the header: format version, kind, config hash, case.
    pub fn open(path: &Path) -> Result<Self, VerifyError> {
        let bad = |message: String| VerifyError::Golden {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read ({e}); check the path")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e}); is this a golden made by golden/generate.py?")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
        let get = |k: &str| -> Result<&String, VerifyError> {
            meta.get(k).ok_or_else(|| bad(format!("header has no `{k}`; is this a golden made by golden/generate.py?")))
        };
        let version = get("ocrp.golden.format_version")?;
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "golden format version {version}; this build reads version {FORMAT_VERSION}: update ocr-patch or regenerate the golden"
            )));
        }
        let kind = match get("ocrp.golden.kind")?.as_str() {
            "vision" => Kind::Vision,
            "language" => Kind::Language,
            "summary" => Kind::Summary,
            k => return Err(bad(format!("unknown golden kind `{k}` (expected vision, language or summary)"))),
        };
        let config_json = get("config.json")?.clone();
        let config: serde_json::Value =
            serde_json::from_str(&config_json).map_err(|e| bad(format!("`config.json` in the header is not JSON: {e}")))?;
        let sha = crate::model::synth::config_sha256(&config);
        if &sha != get("config.sha256")? {
            return Err(bad(format!(
                "`config.sha256` is {} but the stored config hashes to {sha}; the golden is corrupt",
                get("config.sha256")?
            )));
        }
        let num = |k: &str| -> Result<usize, VerifyError> {
            get(k)?.parse().map_err(|_| bad(format!("`{k}` is not a number")))
        };
        let crop = get("case.crop_mode")? == "true";
        let wh: Vec<usize> = serde_json::from_str(get("case.tiles_wh")?)
            .map_err(|_| bad("`case.tiles_wh` is not a list of two numbers".into()))?;
        let case = Case {
            name: get("case")?.clone(),
            global_size: if crop { num("case.base_size")? } else { num("case.image_size")? },
            tiles: if crop {
                match wh.as_slice() {
                    [w, h] => Some((num("case.image_size")?, *w, *h)),
                    _ => return Err(bad("`case.tiles_wh` is not a list of two numbers".into())),
                }
            } else {
                None
            },
        };
        let seed = meta.get("synth.seed").and_then(|s| s.parse().ok());

        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let d = view.data();
            let data = match view.dtype() {
                Dtype::F32 => GData::F32(d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
                Dtype::I64 => GData::I64(
                    d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect(),
                ),
                Dtype::U8 | Dtype::BOOL => GData::U8(d.to_vec()),
                other => return Err(bad(format!("tensor `{name}` is {other:?}; goldens hold f32, i64 and u8"))),
            };
            tensors.insert(name, GTensor { shape, data });
        }
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            meta,
            tensors,
            case,
            config_json,
            config,
            seed,
        })
    }

    pub fn file_name(&self) -> String {
        self.path.file_name().map_or_else(|| self.path.display().to_string(), |n| n.to_string_lossy().into_owned())
    }

    pub fn meta(&self, k: &str) -> &str {
        self.meta.get(k).map_or("?", |s| s.as_str())
    }

    pub fn tensor(&self, name: &str) -> Result<&GTensor, VerifyError> {
        self.tensors.get(name).ok_or_else(|| VerifyError::Golden {
            path: self.path.display().to_string(),
            message: format!("has no tensor `{name}`; was it made by golden/generate.py?"),
        })
    }

    pub fn f32_tensor(&self, name: &str) -> Result<(&[usize], &[f32]), VerifyError> {
        let t = self.tensor(name)?;
        let v = t.f32().ok_or_else(|| VerifyError::Golden {
            path: self.path.display().to_string(),
            message: format!("tensor `{name}` is not float32"),
        })?;
        Ok((&t.shape, v))
    }

    pub fn int_tensor(&self, name: &str) -> Result<Vec<i64>, VerifyError> {
        self.tensor(name)?.ints().ok_or_else(|| VerifyError::Golden {
            path: self.path.display().to_string(),
            message: format!("tensor `{name}` is not an integer tensor"),
        })
    }

    /// The language golden's vision golden (`vision_golden`, next to it), if it exists.
    pub fn vision_golden_path(&self) -> Option<PathBuf> {
        let name = self.meta.get("vision_golden")?;
        let p = self.path.parent().unwrap_or(Path::new(".")).join(name);
        p.exists().then_some(p)
    }

    /// Language goldens: the number of decoder layers stored (`layer.{i}`).
    pub fn num_layers(&self) -> usize {
        (0..).take_while(|i| self.tensors.contains_key(&format!("layer.{i}"))).count()
    }
}

/// `u8[view][c][y][x]` of golden/README.md, normalised as `BasicImageTransform` does
/// (ToTensor, then Normalize(0.5, 0.5)). `page`: the brightened variant of the GPU summaries,
/// `u8' = 255 - (u8 >> 2)` (the plain pattern sums to exactly 0 in bf16, which the remote code
/// takes for "no image"; docs/fidelity.md).
fn pixel(view: usize, c: usize, y: usize, x: usize, page: bool) -> f32 {
    let u = (3 * x * (c + 1) + 5 * y + 2 * ((x ^ y) & 63) + 50 * c + 37 * view) % 256;
    let u = if page { 255 - (u >> 2) } else { u };
    (u as f32 / 255.0 - 0.5) / 0.5
}

/// The pixels of a case: the global view `(1, 3, S, S)` and the tiles `(n, 3, T, T)`, as flat
/// f32 vectors, C order.
pub struct Pixels {
    pub global: Vec<f32>,
    pub tiles: Option<Vec<f32>>,
}

impl Pixels {
    pub fn of(case: &Case) -> Self {
        Self::of_variant(case, false)
    }

    /// [`Self::of`], or with `page` the brightened pattern (`pixels.variant` = `page`).
    pub fn of_variant(case: &Case, page: bool) -> Self {
        let s = case.global_size;
        let mut global = Vec::with_capacity(3 * s * s);
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    global.push(pixel(0, c, y, x, page));
                }
            }
        }
        let tiles = case.tiles.map(|(t, wc, hc)| {
            let mut v = Vec::with_capacity(wc * hc * 3 * t * t);
            for i in 0..wc * hc {
                let (x0, y0) = ((i % wc) * t, (i / wc) * t);
                for c in 0..3 {
                    for y in 0..t {
                        for x in 0..t {
                            v.push(pixel(1, c, y0 + y, x0 + x, page));
                        }
                    }
                }
            }
            v
        });
        Self { global, tiles }
    }

    /// The hashes the vision golden's header holds (`pixels.global.sha256`, `pixels.tiles.sha256`).
    pub fn sha256(v: &[f32]) -> String {
        let mut h = Sha256::new();
        for x in v {
            h.update(x.to_le_bytes());
        }
        hex::encode(h.finalize())
    }
}
