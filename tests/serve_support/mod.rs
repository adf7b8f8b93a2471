//! Shared by the serve tests: one synthetic `cpu` engine per test binary, servers on loopback
//! port 0, a blocking HTTP client, request builders and metric readers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use candle_core::{DType, Device, Tensor};
use ocr_patch::model::ocr::OcrEngine;
use ocr_patch::model::tokenizer::OcrTokenizer;
use ocr_patch::serve::{Model, ServeConfig, Server};
use serde_json::{json, Value};

/// JSON bodies without reqwest's `json` feature.
pub trait JsonBody {
    fn json(self, v: &Value) -> Self;
}

impl JsonBody for reqwest::blocking::RequestBuilder {
    fn json(self, v: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(serde_json::to_vec(v).unwrap())
    }
}

pub trait JsonResponse {
    fn json_value(self) -> Result<Value, String>;
}

impl JsonResponse for reqwest::blocking::Response {
    fn json_value(self) -> Result<Value, String> {
        let b = self.bytes().map_err(|e| e.to_string())?;
        serde_json::from_slice(&b).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&b)))
    }
}

/// The `cpu` golden config on synthetic weights (seed 1) with the byte-level tokenizer, built
/// once per test binary.
pub fn engine() -> Arc<OcrEngine> {
    static E: OnceLock<Arc<OcrEngine>> = OnceLock::new();
    E.get_or_init(|| {
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/configs/cpu.json");
        Arc::new(
            OcrEngine::synthetic(
                &cfg,
                1,
                OcrTokenizer::byte_level(),
                DType::F32,
                &Device::Cpu,
            )
            .expect("synthetic cpu engine"),
        )
    })
    .clone()
}

/// The page most tests send (one vision encode per binary, then the shared server's cache).
pub fn page() -> image::RgbImage {
    image(50, 40, 3)
}

/// One server with the default configuration (but a 4 MiB body limit and local files allowed
/// under a folder holding `page.png`), shared by the tests of a binary, so its vision cache is.
pub fn shared() -> &'static (Server, std::path::PathBuf) {
    static S: OnceLock<(Server, std::path::PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ocr-serve-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        page().save(dir.join("page.png")).unwrap();
        let srv = server(ServeConfig {
            max_body_bytes: 4 << 20,
            allowed_local_media_path: Some(dir.clone()),
            ..ServeConfig::default()
        });
        (srv, dir)
    })
}

/// The engine with a 64-image vision cache, shared by every server of the binary (so each
/// distinct image costs one encoder run per binary).
pub fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| Model::new(engine(), 64)).clone()
}

pub fn server(cfg: ServeConfig) -> Server {
    Server::start(model(), cfg, "127.0.0.1:0".parse().unwrap()).expect("server starts")
}

pub fn url(s: &Server, path: &str) -> String {
    format!("http://{}{path}", s.addr)
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .no_proxy()
        .build()
        .unwrap()
}

/// A deterministic test pattern.
pub fn image(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 5 + seed * 17) % 256) as u8,
            ((x * y + seed) % 256) as u8,
        ])
    })
}

pub fn png_bytes(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub fn png_data_url(img: &image::RgbImage) -> String {
    format!("data:image/png;base64,{}", b64(&png_bytes(img)))
}

/// A chat request with one image part and `extra` fields merged in.
pub fn chat_body(image_url: &str, extra: Value) -> Value {
    let mut v = json!({
        "model": "deepseek-ai/DeepSeek-OCR",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "Free OCR."}
        ]}],
        "temperature": 0.0,
    });
    if let Value::Object(m) = extra {
        for (k, x) in m {
            v[k] = x;
        }
    }
    v
}

/// POST a non-streaming request: the JSON body on 200, else (status, JSON error).
pub fn post(s: &Server, body: &Value) -> Result<Value, (u16, Value)> {
    let resp = client()
        .post(url(s, "/v1/chat/completions"))
        .json(body)
        .send()
        .expect("request sent");
    let status = resp.status().as_u16();
    let v: Value = resp.json_value().expect("a JSON body");
    if status == 200 {
        Ok(v)
    } else {
        Err((status, v))
    }
}

/// POST a streaming request: the `data:` payloads in order.
pub fn stream(s: &Server, body: &Value) -> Result<Vec<String>, (u16, String)> {
    let resp = client()
        .post(url(s, "/v1/chat/completions"))
        .json(body)
        .send()
        .expect("request sent");
    let status = resp.status().as_u16();
    if status != 200 {
        return Err((status, resp.text().unwrap_or_default()));
    }
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut out = vec![];
    for line in BufReader::new(resp).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            out.push(d.to_string());
        }
    }
    Ok(out)
}

pub fn token_ids(v: &Value) -> Value {
    v["ocr"]["pages"][0]["token_ids"].clone()
}

pub fn metrics(s: &Server) -> String {
    client()
        .get(url(s, "/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

/// The value of an unlabelled metric line.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

pub fn metric_outcome(text: &str, outcome: &str) -> f64 {
    metric(
        text,
        &format!("ocr_requests_total{{outcome=\"{outcome}\"}}"),
    )
}

/// A tensor's values, for exact comparison.
pub fn rows(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}
