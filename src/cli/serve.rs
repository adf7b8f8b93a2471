//! `ocr-patch serve`: loads the model and runs the OpenAI-compatible server until Ctrl-C or
//! SIGTERM. Wiring only: [`crate::serve`] does the work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::ocr::{ModeArg, ModelSource};
use super::Exit;
use crate::model::preprocess::MAX_IMAGE_PIXELS;
use crate::serve::{self, ServeConfig};

/// Serve DeepSeek-OCR (the Rust model) over an OpenAI-compatible HTTP API, as vLLM's server.
///
/// POST /v1/chat/completions (image_url parts: data URLs, local files under
/// --allowed-local-media-path, remote URLs with --allow-remote-urls; PDFs as data URLs or file
/// parts; "stream": true for SSE), GET /v1/models, GET /health, GET /metrics. Requests decode
/// together in one batch that they join and leave at token boundaries; a full queue answers 429.
/// Binds 127.0.0.1 unless --host says otherwise.
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: ModelSource,

    /// Address to bind (0.0.0.0 to accept other hosts, e.g. inside a container)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// The model name clients send and /v1/models lists
    #[arg(long, default_value = "deepseek-ai/DeepSeek-OCR", value_name = "NAME")]
    pub served_model_name: String,

    /// Require `Authorization: Bearer KEY` on /v1/* (compared in constant time)
    #[arg(
        long,
        env = "OCR_PATCH_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,

    /// Resolution mode when a request names none (requests may send "mode")
    #[arg(long, value_enum, default_value = "gundam")]
    pub mode: ModeArg,

    /// Most sequences (images, PDF pages) decoding at once
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_batch: usize,

    /// Requests that may wait for the batch; beyond that the server answers 429
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub queue: usize,

    /// Images whose vision-encoder output is kept, keyed by a hash of the pixels and the mode
    /// (a repeated image skips the encoder); 0 turns the cache off
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub vision_cache: usize,

    /// Seconds a request may take from arrival to its last token (then 504, or an error event)
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub timeout: u64,

    /// Default and largest max_tokens of a request
    #[arg(long, default_value_t = 8192, value_name = "N")]
    pub max_tokens: usize,

    /// Largest request body in bytes (images and PDFs arrive base64 in the body)
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    pub max_body_bytes: usize,

    /// Refuse images and rendered PDF pages with more pixels than this (read from the header)
    #[arg(long, default_value_t = MAX_IMAGE_PIXELS, value_name = "N")]
    pub max_pixels: u64,

    /// Most images plus PDF pages per request; a longer PDF is refused before rendering
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_pages: usize,

    /// Resolution PDF pages are rendered at (requests may send "dpi")
    #[arg(long, default_value_t = serve::pdf::DEFAULT_DPI, value_name = "DPI")]
    pub pdf_dpi: u32,

    /// Allow cross-origin requests from this origin (`*` for any); repeatable. Off by default
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,

    /// Allow image_url to name local files (path or file://) under this folder
    #[arg(long, value_name = "DIR")]
    pub allowed_local_media_path: Option<PathBuf>,

    /// Fetch http(s) image URLs (the server then makes outbound requests for clients)
    #[arg(long)]
    pub allow_remote_urls: bool,
}

pub fn run(a: ServeArgs) -> anyhow::Result<Exit> {
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (a.host.as_str(), a.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("--host {}: not an address or a resolvable name", a.host))?;
    if let Some(dir) = &a.allowed_local_media_path {
        anyhow::ensure!(
            dir.is_dir(),
            "--allowed-local-media-path {}: not a folder",
            dir.display()
        );
    }
    let engine = a.source.engine(a.source.tokenizer()?)?;
    let cfg = ServeConfig {
        model_name: a.served_model_name,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_batch: a.max_batch,
        queue: a.queue,
        timeout: Duration::from_secs(a.timeout),
        max_tokens: a.max_tokens,
        mode: a.mode.into(),
        max_body_bytes: a.max_body_bytes,
        max_pixels: a.max_pixels,
        max_pages: a.max_pages,
        pdf_dpi: a.pdf_dpi,
        cors_origins: a.cors_origins,
        allowed_local_media_path: a.allowed_local_media_path,
        allow_remote_urls: a.allow_remote_urls,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}; is the port taken?"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "serving {} on http://{local} (POST /v1/chat/completions; auth {})",
            cfg.model_name,
            if cfg.api_key.is_some() { "on" } else { "off" }
        );
        let model = serve::Model::new(Arc::new(engine), a.vision_cache);
        serve::serve(listener, model, cfg, shutdown_signal())
            .await
            .context("the server failed")
    })?;
    eprintln!("stopped");
    Ok(Exit::Done)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
