//! The batching loop: one thread owns the running batch. Between two decoding steps it takes
//! new work from the bounded queue, encodes the new images' vision rows together (or takes them
//! from the vision cache), prefills them into the batch, drops sequences whose client went away
//! or whose deadline passed, then advances every running sequence by one token.
//!
//! Owns: admission order (first come, first served, pages of one request in order), the batch
//! size, cancellation and timeouts at token boundaries, the vision cache. Tokens go back to the
//! HTTP side on each sequence's own channel.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::Model;
use crate::model::generate::{GenerationConfig, StopReason};
use crate::model::ocr::OcrEngine;
use crate::model::preprocess::{PromptTokens, Views};
use crate::model::stepwise::Sequence;

/// What a sequence reports to its request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Admitted into the batch (prefill done): prompt length.
    Started {
        prompt_tokens: usize,
    },
    Token(u32),
    Done(StopReason),
    /// The deadline passed before it finished.
    Timeout,
    Failed(String),
}

/// One image of a request, ready to run.
pub struct Item {
    pub prompt: PromptTokens,
    pub views: Views,
    /// Vision-cache key: hash of the image's pixels and the mode.
    pub key: [u8; 32],
    pub cfg: GenerationConfig,
    pub events: mpsc::UnboundedSender<Event>,
    pub deadline: Instant,
    pub queued: Instant,
}

/// One request: its items run as separate sequences, admitted in order.
pub struct Job {
    pub items: Vec<Item>,
}

/// Least recently used vision rows, by image and mode.
pub struct VisionCache {
    cap: usize,
    map: HashMap<[u8; 32], Tensor>,
    order: VecDeque<[u8; 32]>,
}

impl VisionCache {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&mut self, k: &[u8; 32]) -> Option<Tensor> {
        let t = self.map.get(k)?.clone();
        if let Some(i) = self.order.iter().position(|x| x == k) {
            self.order.remove(i);
        }
        self.order.push_back(*k);
        Some(t)
    }

    fn put(&mut self, k: [u8; 32], t: Tensor) {
        if self.cap == 0 || self.map.contains_key(&k) {
            return;
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map.insert(k, t);
        self.order.push_back(k);
    }
}

struct Running {
    seq: Sequence,
    events: mpsc::UnboundedSender<Event>,
    deadline: Instant,
}

pub struct Scheduler {
    pub model: Arc<Model>,
    pub engine: Arc<OcrEngine>,
    pub max_batch: usize,
    pub metrics: Arc<Metrics>,
}

impl Scheduler {
    pub fn new(model: Arc<Model>, max_batch: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            engine: model.engine.clone(),
            model,
            max_batch: max_batch.max(1),
            metrics,
        }
    }

    /// Runs until every sender of `rx` is gone and the batch has drained.
    pub fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut waiting: VecDeque<Item> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        loop {
            if running.is_empty() && waiting.is_empty() {
                self.metrics.queue_depth.store(0, Ordering::Relaxed);
                self.metrics.running.store(0, Ordering::Relaxed);
                match rx.blocking_recv() {
                    Some(j) => waiting.extend(j.items),
                    None => return,
                }
            }
            // Take queued requests only while there is room to admit them soon, so the
            // channel's bound stays the back-pressure.
            while running.len() + waiting.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(j) => waiting.extend(j.items),
                    Err(_) => break,
                }
            }
            let mut admit = Vec::new();
            while running.len() + admit.len() < self.max_batch {
                let Some(item) = waiting.pop_front() else {
                    break;
                };
                if item.events.is_closed() {
                    continue;
                }
                if Instant::now() >= item.deadline {
                    let _ = item.events.send(Event::Timeout);
                    continue;
                }
                admit.push(item);
            }
            // what still waits once this tick's admissions are taken
            self.metrics
                .queue_depth
                .store((rx.len() + waiting.len()) as u64, Ordering::Relaxed);
            if !admit.is_empty() {
                self.admit(admit, &mut running);
            }

            let now = Instant::now();
            running.retain_mut(|r| {
                if r.events.is_closed() {
                    r.seq.cancel();
                    return false;
                }
                if now >= r.deadline {
                    r.seq.cancel();
                    let _ = r.events.send(Event::Timeout);
                    return false;
                }
                true
            });
            self.metrics
                .running
                .store(running.len() as u64, Ordering::Relaxed);
            if running.is_empty() {
                continue;
            }
            let results = {
                let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
                self.engine.step(&mut seqs)
            };
            self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
            let mut made = 0;
            let mut keep = Vec::with_capacity(running.len());
            for (r, res) in running.drain(..).zip(results) {
                match res {
                    Ok(Some(t)) => {
                        made += 1;
                        let _ = r.events.send(Event::Token(t));
                        match r.seq.stop() {
                            Some(stop) => {
                                let _ = r.events.send(Event::Done(stop));
                            }
                            None => keep.push(r),
                        }
                    }
                    Ok(None) => {
                        let stop = r.seq.stop().unwrap_or(StopReason::MaxTokens);
                        let _ = r.events.send(Event::Done(stop));
                    }
                    Err(e) => {
                        let _ = r.events.send(Event::Failed(e.to_string()));
                    }
                }
            }
            running = keep;
            self.metrics
                .running
                .store(running.len() as u64, Ordering::Relaxed);
            self.metrics.generated(made);
        }
    }

    /// Vision rows for the new items (cache, then one batched encoder call for the rest),
    /// then each one's prefill.
    fn admit(&mut self, items: Vec<Item>, running: &mut Vec<Running>) {
        let mut rows: HashMap<[u8; 32], Tensor> = HashMap::new();
        let mut missing: Vec<usize> = Vec::new();
        let mut failed = None;
        for (i, it) in items.iter().enumerate() {
            if rows.contains_key(&it.key) || missing.iter().any(|&j| items[j].key == it.key) {
                continue;
            }
            match self.model.cache().get(&it.key) {
                Some(t) => {
                    self.metrics
                        .vision_cache_hits
                        .fetch_add(1, Ordering::Relaxed);
                    rows.insert(it.key, t);
                }
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            self.metrics
                .vision_cache_misses
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
            let views: Vec<&Views> = missing.iter().map(|&i| &items[i].views).collect();
            match self.engine.encode_batch(&views) {
                Ok(feats) => {
                    for (&i, f) in missing.iter().zip(feats) {
                        self.model.cache().put(items[i].key, f.clone());
                        rows.insert(items[i].key, f);
                    }
                }
                Err(e) => failed = Some(format!("the vision encoder failed: {e}")),
            }
        }
        for it in items {
            let Some(f) = rows.get(&it.key) else {
                let msg = failed.clone().unwrap_or_else(|| "no vision rows".into());
                let _ = it.events.send(Event::Failed(msg));
                continue;
            };
            self.metrics.queue_wait(it.queued.elapsed().as_secs_f64());
            match self.engine.start(&it.prompt, f, it.cfg.clone()) {
                Ok(seq) => {
                    self.metrics
                        .prompt_tokens
                        .fetch_add(seq.prompt_tokens as u64, Ordering::Relaxed);
                    let _ = it.events.send(Event::Started {
                        prompt_tokens: seq.prompt_tokens,
                    });
                    running.push(Running {
                        seq,
                        events: it.events,
                        deadline: it.deadline,
                    });
                }
                Err(e) => {
                    let _ = it
                        .events
                        .send(Event::Failed(format!("prefill failed: {e}")));
                }
            }
        }
    }
}
