//! `ocr-patch serve`: the Rust DeepSeek-OCR behind an OpenAI-compatible HTTP API, a drop-in for
//! vLLM's server in a compose file. `POST /v1/chat/completions` (images as `image_url` parts,
//! PDFs as data URLs or `file` parts, SSE streaming), `GET /v1/models`, `GET /health`,
//! `GET /metrics` (Prometheus text).
//!
//! Owns: HTTP (axum on tokio), authentication (optional API key, constant-time comparison),
//! limits (body, pixels, pages, token budget, a bounded queue answering 429 when full, a
//! per-request timeout), the batching scheduler ([`scheduler`], one thread owning the running
//! batch), metrics ([`metrics`]) and PDF rendering ([`pdf`]). Does not own the model: it drives
//! [`crate::model::stepwise`] and parses grounding with [`crate::model::grounding`].
//!
//! Threads: tokio serves HTTP; request preparation (decoding, PDF rendering, preprocessing)
//! runs on tokio's blocking pool; the model runs on the scheduler's thread only.

pub mod api;
pub mod metrics;
pub mod pdf;
pub mod scheduler;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::model::generate::StopReason;
use crate::model::grounding;
use crate::model::ocr::OcrEngine;
use crate::model::preprocess::Mode;
use crate::model::tokenizer::EOS_ID;
use api::{ApiError, Plan};
use metrics::{Metrics, Outcome};
use scheduler::{Event, Item, Job, Scheduler};

/// Everything `serve` can be told.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The `model` name clients send and `/v1/models` lists.
    pub model_name: String,
    /// Requests to `/v1/*` must carry `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Most sequences decoding at once.
    pub max_batch: usize,
    /// Requests waiting beyond the running batch; more get 429.
    pub queue: usize,
    /// A request still running after this is ended (504, or an error event when streaming).
    pub timeout: Duration,
    /// Default and largest `max_tokens`.
    pub max_tokens: usize,
    /// Resolution mode when the request names none.
    pub mode: Mode,
    pub max_body_bytes: usize,
    /// Per image or rendered page, checked on the header before decoding.
    pub max_pixels: u64,
    /// Images plus PDF pages per request; a PDF with more pages is refused before rendering.
    pub max_pages: usize,
    pub pdf_dpi: u32,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Local files may be named in `image_url` only under this folder.
    pub allowed_local_media_path: Option<PathBuf>,
    /// Fetch `http(s)://` image URLs (off: refused).
    pub allow_remote_urls: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_name: "deepseek-ai/DeepSeek-OCR".into(),
            api_key: None,
            max_batch: 16,
            queue: 64,
            timeout: Duration::from_secs(600),
            max_tokens: 8192,
            mode: Mode::Gundam,
            max_body_bytes: 64 << 20,
            max_pixels: crate::model::preprocess::MAX_IMAGE_PIXELS,
            max_pages: 64,
            pdf_dpi: pdf::DEFAULT_DPI,
            cors_origins: vec![],
            allowed_local_media_path: None,
            allow_remote_urls: false,
        }
    }
}

/// The model a server runs and the vision cache that goes with it: the encoder output of
/// recent images, keyed by a SHA-256 of the decoded pixels and the mode, least recently used
/// evicted. Servers started on the same `Model` share both.
pub struct Model {
    pub engine: Arc<OcrEngine>,
    cache: std::sync::Mutex<scheduler::VisionCache>,
}

impl Model {
    /// `vision_cache`: images kept (0: no cache).
    pub fn new(engine: Arc<OcrEngine>, vision_cache: usize) -> Arc<Self> {
        Arc::new(Self {
            engine,
            cache: std::sync::Mutex::new(scheduler::VisionCache::new(vision_cache)),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, scheduler::VisionCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct AppState {
    engine: Arc<OcrEngine>,
    cfg: ServeConfig,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

type Shared = Arc<AppState>;

/// `a == b` in time independent of where they differ and of their lengths.
pub fn keys_match(given: &str, want: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(want.as_bytes());
    std::hint::black_box(
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y)),
    ) == 0
}

async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(want) = &s.cfg.api_key {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !keys_match(given, want) {
            s.metrics.outcome(Outcome::Unauthorized);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key; send `Authorization: Bearer KEY`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The router with its state; the scheduler thread is started here and stops when the router
/// (and every clone of it) is dropped.
pub fn router(model: Arc<Model>, cfg: ServeConfig) -> Router {
    let engine = model.engine.clone();
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::channel::<Job>(cfg.queue.max(1));
    let sched = Scheduler::new(model, cfg.max_batch, metrics.clone());
    std::thread::Builder::new()
        .name("ocr-scheduler".into())
        .spawn(move || sched.run(rx))
        .expect("cannot start the scheduler thread");
    let state = Arc::new(AppState {
        engine,
        cfg: cfg.clone(),
        jobs: tx,
        metrics,
    });
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    let mut app = Router::new()
        .merge(v1)
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route; see /v1/chat/completions",
            )
        })
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(state);
    if !cfg.cors_origins.is_empty() {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        let origin = if cfg.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(cfg.cors_origins.iter().filter_map(|o| o.parse().ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([
                    axum::http::header::AUTHORIZATION,
                    axum::http::header::CONTENT_TYPE,
                ]),
        );
    }
    app
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Arc<Model>,
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(model, cfg))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A server on its own thread and runtime (tests, embedding). Stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Binds `addr` (port 0: any free port) and starts serving.
    pub fn start(model: Arc<Model>, cfg: ServeConfig, addr: SocketAddr) -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ocr-serve".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener)?;
                    serve(listener, model, cfg, async move {
                        let _ = stopped.await;
                    })
                    .await
                })
            })?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn metrics_text(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.cfg.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "ocr-patch",
            "max_model_len": s.engine.context(),
        }]
    }))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn outcome_of(status: StatusCode) -> Outcome {
    match status.as_u16() {
        401 => Outcome::Unauthorized,
        413 => Outcome::TooLarge,
        429 => Outcome::Overloaded,
        504 => Outcome::Timeout,
        s if s < 500 => Outcome::BadRequest,
        _ => Outcome::Error,
    }
}

async fn chat(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let received = Instant::now();
    match chat_inner(&s, body, received).await {
        Ok(r) => r,
        Err(e) => {
            s.metrics.outcome(outcome_of(e.status));
            e.into_response()
        }
    }
}

/// Per-page receivers of a request queued in the scheduler.
struct Submitted {
    plan: Plan,
    rx: Vec<mpsc::UnboundedReceiver<Event>>,
    deadline: Instant,
}

async fn chat_inner(
    s: &Shared,
    body: Result<Bytes, BytesRejection>,
    received: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is over {} bytes; send smaller images or fewer pages",
                s.cfg.max_body_bytes
            )
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError::new(status, msg)
    })?;
    let req = api::parse(&body)?;
    drop(body);
    let state = s.clone();
    let plan = tokio::task::spawn_blocking(move || api::plan(req, &state.cfg, &state.engine))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("request preparation failed: {e}"),
            )
        })??;
    let deadline = received + s.cfg.timeout;
    let mut rx = vec![];
    let mut items = vec![];
    for p in &plan.pages {
        let (tx, r) = mpsc::unbounded_channel();
        rx.push(r);
        items.push(Item {
            prompt: p.prepared.tokens.clone(),
            views: p.prepared.views.clone(),
            key: p.key,
            cfg: p.cfg.clone(),
            events: tx,
            deadline,
            queued: Instant::now(),
        });
    }
    s.jobs.try_send(Job { items }).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the queue is full ({} requests waiting); retry later",
                s.cfg.queue
            ),
        ),
        mpsc::error::TrySendError::Closed(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ),
    })?;
    let sub = Submitted { plan, rx, deadline };
    if sub.plan.stream {
        Ok(stream_response(s.clone(), sub, received))
    } else {
        complete(s, sub, received).await
    }
}

/// What one page produced.
struct PageResult {
    prompt_tokens: usize,
    tokens: Vec<u32>,
    stop: StopReason,
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens => "length",
        _ => "stop",
    }
}

/// The page's entry in the response's `ocr.pages`.
fn page_json(s: &AppState, plan: &Plan, i: usize, r: &PageResult, text: &str) -> Value {
    let p = &plan.pages[i];
    let mut v = json!({
        "index": i,
        "source": p.source,
        "width": p.prepared.width,
        "height": p.prepared.height,
        "mode": p.prepared.mode.name(),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.tokens.len(),
        "finish_reason": finish_reason(r.stop),
    });
    if plan.return_token_ids {
        v["token_ids"] = json!(r.tokens);
    }
    if plan.grounding {
        let boxes = grounding::parse(text, p.prepared.width, p.prepared.height);
        if plan.draw_boxes {
            v["annotated_image"] = json!(api::draw_boxes(&p.image, &boxes));
        }
        v["boxes"] = json!(boxes);
        v["markdown"] = json!(grounding::markdown(text));
    }
    let _ = s;
    v
}

fn page_text(s: &AppState, tokens: &[u32]) -> Result<String, ApiError> {
    let body: Vec<u32> = tokens.iter().copied().filter(|&t| t != EOS_ID).collect();
    s.engine
        .tokenizer
        .decode(&body, false)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Next event of a page, or the request's timeout.
async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>, deadline: Instant) -> Event {
    // The scheduler enforces the deadline at token boundaries; this is the backstop for a
    // request still queued behind a long step.
    let backstop = tokio::time::Instant::from_std(deadline + Duration::from_secs(5));
    match tokio::time::timeout_at(backstop, rx.recv()).await {
        Ok(Some(e)) => e,
        Ok(None) => Event::Failed("the scheduler dropped the request".into()),
        Err(_) => Event::Timeout,
    }
}

fn event_error(e: Event, s: &AppState) -> ApiError {
    match e {
        Event::Timeout => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the request ran past the server's timeout of {} s; lower max_tokens or retry",
                s.cfg.timeout.as_secs()
            ),
        ),
        Event::Failed(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected event {other:?}"),
        ),
    }
}

/// Records `Cancelled` when a request's future or stream is dropped before it finished.
struct Watch {
    metrics: Arc<Metrics>,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.outcome(Outcome::Cancelled);
        }
    }
}

async fn complete(s: &Shared, mut sub: Submitted, received: Instant) -> Result<Response, ApiError> {
    let mut watch = Watch {
        metrics: s.metrics.clone(),
        done: false,
    };
    let mut results = vec![];
    let mut first = true;
    for rx in sub.rx.iter_mut() {
        let mut r = PageResult {
            prompt_tokens: 0,
            tokens: vec![],
            stop: StopReason::StopToken,
        };
        loop {
            match next_event(rx, sub.deadline).await {
                Event::Started { prompt_tokens } => r.prompt_tokens = prompt_tokens,
                Event::Token(t) => {
                    if first {
                        first = false;
                        s.metrics.first_token(received.elapsed().as_secs_f64());
                    }
                    r.tokens.push(t);
                }
                Event::Done(stop) => {
                    r.stop = stop;
                    break;
                }
                e => {
                    watch.done = true;
                    return Err(event_error(e, s));
                }
            }
        }
        results.push(r);
    }
    watch.done = true;
    let plan = &sub.plan;
    let mut texts = vec![];
    let mut pages = vec![];
    for (i, r) in results.iter().enumerate() {
        let t = page_text(s, &r.tokens)?;
        pages.push(page_json(s, plan, i, r, &t));
        texts.push(t);
    }
    let prompt: usize = results.iter().map(|r| r.prompt_tokens).sum();
    let completion: usize = results.iter().map(|r| r.tokens.len()).sum();
    let finish = if results.iter().any(|r| r.stop == StopReason::MaxTokens) {
        "length"
    } else {
        "stop"
    };
    s.metrics.outcome(Outcome::Ok);
    s.metrics.latency(received.elapsed().as_secs_f64());
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", request_id()),
        "object": "chat.completion",
        "created": now(),
        "model": s.cfg.model_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": texts.join(api::PAGE_SPLIT)},
            "finish_reason": finish,
        }],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        "ocr": {"pages": pages},
    }))
    .into_response())
}

fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{:x}{:06x}", now(), N.fetch_add(1, Ordering::Relaxed))
}

/// Incremental text of one page (as `tokenizer::StreamDecoder`, owning its engine handle).
struct TextStream {
    engine: Arc<OcrEngine>,
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    fn push(&mut self, id: u32) -> String {
        if id != EOS_ID {
            self.ids.push(id);
        }
        self.flush(false)
    }
    /// New text; held back while it ends inside a multi-byte character unless `last`.
    fn flush(&mut self, last: bool) -> String {
        let Ok(text) = self.engine.tokenizer.decode(&self.ids, false) else {
            return String::new();
        };
        if (!last && text.ends_with('\u{FFFD}'))
            || text.len() < self.printed
            || !text.is_char_boundary(self.printed)
        {
            return String::new();
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        new
    }
}

struct StreamState {
    s: Shared,
    sub: Submitted,
    id: String,
    created: u64,
    received: Instant,
    page: usize,
    text: TextStream,
    page_tokens: Vec<u32>,
    prompt_tokens: usize,
    results: Vec<PageResult>,
    texts: Vec<String>,
    phase: Phase,
    first: bool,
    watch: Watch,
}

#[derive(PartialEq)]
enum Phase {
    Role,
    Pages,
    Usage,
    Done,
    Closed,
}

impl StreamState {
    fn chunk(&self, delta: Value, finish: Option<&str>, extra: Option<(&str, Value)>) -> SseEvent {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.s.cfg.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if let Some((k, x)) = extra {
            v[k] = x;
        }
        SseEvent::default().data(v.to_string())
    }

    /// The next SSE event, or `None` when the stream is over.
    async fn next(&mut self) -> Option<SseEvent> {
        match self.phase {
            Phase::Role => {
                self.phase = Phase::Pages;
                return Some(self.chunk(json!({"role": "assistant", "content": ""}), None, None));
            }
            Phase::Usage => {
                self.phase = Phase::Done;
                let prompt: usize = self.results.iter().map(|r| r.prompt_tokens).sum();
                let completion: usize = self.results.iter().map(|r| r.tokens.len()).sum();
                let mut v = json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.s.cfg.model_name, "choices": [],
                });
                v["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
                return Some(SseEvent::default().data(v.to_string()));
            }
            Phase::Done => {
                self.phase = Phase::Closed;
                return Some(SseEvent::default().data("[DONE]"));
            }
            Phase::Closed => return None,
            Phase::Pages => {}
        }
        loop {
            let ev = next_event(&mut self.sub.rx[self.page], self.sub.deadline).await;
            match ev {
                Event::Started { prompt_tokens } => self.prompt_tokens = prompt_tokens,
                Event::Token(t) => {
                    if self.first {
                        self.first = false;
                        self.s
                            .metrics
                            .first_token(self.received.elapsed().as_secs_f64());
                    }
                    self.page_tokens.push(t);
                    let delta = self.text.push(t);
                    if !delta.is_empty() || self.sub.plan.return_token_ids {
                        let mut d = json!({"content": delta});
                        if self.sub.plan.return_token_ids {
                            d["token_ids"] = json!([t]);
                        }
                        return Some(self.chunk(d, None, None));
                    }
                }
                Event::Done(stop) => {
                    let rest = self.text.flush(true);
                    let r = PageResult {
                        prompt_tokens: self.prompt_tokens,
                        tokens: std::mem::take(&mut self.page_tokens),
                        stop,
                    };
                    let text = page_text(&self.s, &r.tokens).unwrap_or_default();
                    self.texts.push(text);
                    self.results.push(r);
                    self.page += 1;
                    self.text = TextStream {
                        engine: self.s.engine.clone(),
                        ids: vec![],
                        printed: 0,
                    };
                    if self.page < self.sub.rx.len() {
                        let sep = format!("{rest}{}", api::PAGE_SPLIT);
                        return Some(self.chunk(json!({"content": sep}), None, None));
                    }
                    // the last page: the final chunk carries finish_reason and the pages
                    let pages: Vec<Value> = self
                        .results
                        .iter()
                        .enumerate()
                        .map(|(i, r)| page_json(&self.s, &self.sub.plan, i, r, &self.texts[i]))
                        .collect();
                    let finish = if self.results.iter().any(|r| r.stop == StopReason::MaxTokens) {
                        "length"
                    } else {
                        "stop"
                    };
                    self.watch.done = true;
                    self.s.metrics.outcome(Outcome::Ok);
                    self.s
                        .metrics
                        .latency(self.received.elapsed().as_secs_f64());
                    self.phase = if self.sub.plan.include_usage {
                        Phase::Usage
                    } else {
                        Phase::Done
                    };
                    let delta = if rest.is_empty() {
                        json!({})
                    } else {
                        json!({"content": rest})
                    };
                    return Some(self.chunk(
                        delta,
                        Some(finish),
                        Some(("ocr", json!({"pages": pages}))),
                    ));
                }
                e => {
                    let err = event_error(e, &self.s);
                    self.watch.done = true;
                    self.s.metrics.outcome(outcome_of(err.status));
                    self.phase = Phase::Done;
                    return Some(SseEvent::default().data(err.body().to_string()));
                }
            }
        }
    }
}

fn stream_response(s: Shared, sub: Submitted, received: Instant) -> Response {
    let st = StreamState {
        text: TextStream {
            engine: s.engine.clone(),
            ids: vec![],
            printed: 0,
        },
        watch: Watch {
            metrics: s.metrics.clone(),
            done: false,
        },
        s,
        sub,
        id: format!("chatcmpl-{}", request_id()),
        created: now(),
        received,
        page: 0,
        page_tokens: vec![],
        prompt_tokens: 0,
        results: vec![],
        texts: vec![],
        phase: Phase::Role,
        first: true,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        let ev = st.next().await?;
        Some((Ok::<_, Infallible>(ev), st))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_compare_whole() {
        assert!(keys_match("secret", "secret"));
        assert!(!keys_match("secre", "secret"));
        assert!(!keys_match("secretx", "secret"));
        assert!(!keys_match("", "secret"));
    }
}
