//! `ocr-patch serve` over real HTTP on loopback, on the `cpu` synthetic model (full SAM-B +
//! CLIP-L vision encoder, 2-layer decoder; an image costs 5-15 s of encoder on 2 cores, so the
//! tests share one engine and vision cache, and use Tiny mode and few tokens):
//! batched vision rows are bit-identical, the step-wise API and concurrent requests through the
//! server give exactly the tokens of serial `OcrEngine::run`s, streaming equals non-streaming,
//! disconnects cancel, overload is 429, timeouts are 504, PDFs run page by page, and bad inputs
//! are 4xx JSON errors while the server keeps serving.
#![cfg(feature = "serve")]

mod png_support;
use png_support::png_bomb;
#[path = "serve_support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ocr_patch::model::preprocess::Mode;
use ocr_patch::serve::{pdf, Model, ServeConfig, Server};
use serde_json::{json, Value};
use support::*;

#[test]
fn batching_gives_the_tokens_of_serial_runs() {
    let e = engine();
    let (a, b) = (image(40, 30, 1), image(70, 20, 2));
    let pa = e.prepare(&a, Mode::Tiny, "<image>\nFree OCR.").unwrap();
    let pb = e.prepare(&b, Mode::Tiny, "<image>\nFree OCR.").unwrap();
    // vision: a second in a batch of two gives its rows alone, to the bit
    let fa = e.encode_views(&pa.views).unwrap();
    let both = e.encode_batch(&[&pb.views, &pa.views]).unwrap();
    assert_eq!(both.len(), 2);
    assert_eq!(
        rows(&both[1]),
        rows(&fa),
        "batched vision rows differ from one image's"
    );
    let fb = both[0].clone();
    assert_ne!(rows(&fa), rows(&fb));

    // the serial references: `ocr`'s own loop, one image at a time
    let want_a = e.run(&pa, 12, |_| {}).unwrap();
    let want_b = e.run(&pb, 12, |_| {}).unwrap();
    assert_ne!(want_a.tokens, want_b.tokens);

    // step-wise, b joining after a's third token
    let mut sa = e.start(&pa.tokens, &fa, e.infer_config(0, 12)).unwrap();
    let mut sb = e.start(&pb.tokens, &fb, e.infer_config(0, 12)).unwrap();
    for _ in 0..3 {
        e.step(&mut [&mut sa]);
    }
    while sa.stop().is_none() || sb.stop().is_none() {
        for r in e.step(&mut [&mut sa, &mut sb]) {
            r.unwrap();
        }
    }
    assert_eq!(
        (sa.tokens(), sa.stop()),
        (want_a.tokens.as_slice(), Some(want_a.stop))
    );
    assert_eq!(
        (sb.tokens(), sb.stop()),
        (want_b.tokens.as_slice(), Some(want_b.stop))
    );
    assert_eq!(sa.prompt_tokens, want_a.prompt_tokens);

    // through the server: 4 concurrent requests (2 per image) on a fresh vision cache, so the
    // scheduler encodes the images together and decodes the requests in one batch
    let srv = Arc::new(
        Server::start(
            Model::new(e.clone(), 8),
            ServeConfig::default(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap(),
    );
    let urls = [png_data_url(&a), png_data_url(&b)];
    let want = [json!(want_a.tokens), json!(want_b.tokens)];
    let go = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|k| {
            let (srv, go) = (srv.clone(), go.clone());
            let body = chat_body(
                &urls[k % 2],
                json!({"max_tokens": 12, "return_token_ids": true, "mode": "tiny"}),
            );
            std::thread::spawn(move || {
                go.wait();
                token_ids(&post(&srv, &body).unwrap())
            })
        })
        .collect();
    for (k, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.join().unwrap(),
            want[k % 2],
            "request {k} differs from its serial run"
        );
    }
    // they really shared steps: fewer batch steps than tokens generated
    let m = metrics(&srv);
    let (steps, tokens) = (
        metric(&m, "ocr_decode_steps_total"),
        metric(&m, "ocr_generated_tokens_total"),
    );
    assert_eq!(
        tokens as usize,
        2 * (want_a.tokens.len() + want_b.tokens.len())
    );
    assert!(
        steps < tokens,
        "no batching happened: {steps} steps for {tokens} tokens"
    );
}

#[test]
fn streaming_and_non_streaming_give_the_same_tokens_and_text() {
    let srv = &shared().0;
    let img = png_data_url(&page());
    let body = chat_body(
        &img,
        json!({"max_tokens": 10, "return_token_ids": true, "mode": "tiny"}),
    );
    let full = post(srv, &body).unwrap();
    assert_eq!(full["object"], "chat.completion");
    let page = &full["ocr"]["pages"][0];
    let ids: Vec<u64> = serde_json::from_value(page["token_ids"].clone()).unwrap();
    assert!(!ids.is_empty() && ids.len() <= 10);
    assert_eq!(full["usage"]["completion_tokens"], ids.len());
    assert_eq!(page["mode"], "tiny");
    assert_eq!(
        (page["width"].as_u64(), page["height"].as_u64()),
        (Some(50), Some(40))
    );

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let chunks = stream(srv, &sbody).unwrap();
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    let mut sids = vec![];
    let mut finish = None;
    let mut usage = None;
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(ch) = v["choices"].get(0) {
            text.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            if let Some(t) = ch["delta"]["token_ids"].as_array() {
                sids.extend(t.iter().map(|x| x.as_u64().unwrap()));
            }
            if !ch["finish_reason"].is_null() {
                finish = Some(ch["finish_reason"].clone());
            }
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(sids, ids);
    assert_eq!(
        text,
        full["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(finish, Some(full["choices"][0]["finish_reason"].clone()));
    assert_eq!(usage, Some(full["usage"].clone()));
}

#[test]
fn a_client_that_disconnects_is_cancelled_at_a_token_boundary() {
    let srv = server(ServeConfig::default());
    let img = png_data_url(&page());
    let body = chat_body(
        &img,
        json!({"max_tokens": 4000, "mode": "tiny", "ignore_eos": true, "stream": true}),
    );
    let resp = client()
        .post(url(&srv, "/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut r = BufReader::new(resp);
    let mut seen = 0;
    let mut line = String::new();
    while seen < 5 {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            seen += 1;
        }
    }
    drop(r);
    let t = Instant::now();
    loop {
        let m = metrics(&srv);
        if metric(&m, "ocr_running_sequences") == 0.0 && metric_outcome(&m, "cancelled") >= 1.0 {
            assert!(metric(&m, "ocr_generated_tokens_total") < 4000.0);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "not cancelled:\n{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // and it serves the next one
    let ok = post(
        &srv,
        &chat_body(&img, json!({"max_tokens": 2, "mode": "tiny"})),
    )
    .unwrap();
    assert_eq!(ok["object"], "chat.completion");
}

#[test]
fn overload_is_429_with_a_json_error_and_the_server_recovers() {
    let srv = Arc::new(server(ServeConfig {
        max_batch: 1,
        queue: 1,
        ..ServeConfig::default()
    }));
    let img = png_data_url(&image(20, 20, 5));
    // warm the vision cache so the requests below are decode-bound
    post(
        &srv,
        &chat_body(&img, json!({"max_tokens": 1, "mode": "tiny"})),
    )
    .unwrap();
    let go = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (srv, go) = (srv.clone(), go.clone());
            let b = chat_body(
                &img,
                json!({"max_tokens": 300, "mode": "tiny", "ignore_eos": true}),
            );
            std::thread::spawn(move || {
                go.wait();
                post(&srv, &b)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let rejected: Vec<&(u16, Value)> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!rejected.is_empty(), "nothing was refused");
    for (status, v) in &rejected {
        assert_eq!(*status, 429, "{v}");
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }
    assert!(results.iter().filter(|r| r.is_ok()).count() >= 2);
    assert!(metric_outcome(&metrics(&srv), "overloaded") >= 1.0);
    post(
        &srv,
        &chat_body(&img, json!({"max_tokens": 1, "mode": "tiny"})),
    )
    .unwrap();
}

#[test]
fn a_request_past_its_timeout_is_504() {
    let srv = server(ServeConfig {
        timeout: Duration::from_secs(2),
        ..ServeConfig::default()
    });
    let img = png_data_url(&image(21, 22, 6));
    let (status, v) = post(
        &srv,
        &chat_body(
            &img,
            json!({"max_tokens": 8000, "mode": "tiny", "ignore_eos": true}),
        ),
    )
    .unwrap_err();
    assert_eq!(status, 504, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("timeout"));
    assert_eq!(metric(&metrics(&srv), "ocr_running_sequences"), 0.0);
}

#[test]
fn a_pdf_runs_page_by_page_and_streams_in_order() {
    let srv = &shared().0;
    let doc = format!(
        "data:application/pdf;base64,{}",
        b64(&pdf::synthetic_pdf(9, 200, 100))
    );
    let body = json!({
        "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_data": doc}},
            {"type": "text", "text": "Free OCR."}
        ]}],
        "max_tokens": 3, "mode": "tiny", "dpi": 72, "pages": [1, 9], "return_token_ids": true,
        "grounding": true, "draw_boxes": true
    });
    let v = post(srv, &body).unwrap();
    let pages = v["ocr"]["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 2);
    assert!(pages[0]["source"].as_str().unwrap().ends_with("page 1"));
    assert!(pages[1]["source"].as_str().unwrap().ends_with("page 9"));
    assert_eq!(
        (pages[0]["width"].as_u64(), pages[0]["height"].as_u64()),
        (Some(200), Some(100))
    );
    assert!(pages[0]["boxes"].is_array());
    assert!(pages[0]["annotated_image"]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,"));
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.matches("<--- Page Split --->").count(), 1);
    // pages 1 and 9 are drawn alike (the rectangle's shift repeats every 8 pages): same tokens
    assert_eq!(pages[0]["token_ids"], pages[1]["token_ids"]);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let chunks = stream(srv, &sbody).unwrap();
    let text: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str::<Value>(c).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, content);
}

#[test]
fn bad_inputs_are_4xx_json_errors_and_the_server_keeps_serving() {
    let srv = &shared().0;
    let good = chat_body(
        &png_data_url(&page()),
        json!({"max_tokens": 1, "mode": "tiny"}),
    );
    let png = png_bytes(&image(64, 64, 8));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"messages\": [".to_vec(), 400),
        (
            "wrong type",
            br#"{"messages": [{"role": "user", "content": 5}]}"#.to_vec(),
            400,
        ),
        (
            "max_tokens a string",
            serde_json::to_vec(&{
                let mut g = good.clone();
                g["max_tokens"] = json!("ten");
                g
            })
            .unwrap(),
            400,
        ),
        (
            "no image",
            br#"{"messages": [{"role": "user", "content": "hello"}]}"#.to_vec(),
            400,
        ),
        (
            "not an image",
            serde_json::to_vec(&chat_body(
                &format!("data:image/png;base64,{}", b64(b"just some text")),
                json!({}),
            ))
            .unwrap(),
            400,
        ),
        (
            "truncated PNG",
            serde_json::to_vec(&chat_body(
                &format!("data:image/png;base64,{}", b64(&png[..png.len() / 2])),
                json!({}),
            ))
            .unwrap(),
            400,
        ),
        (
            "50000 x 50000 header",
            serde_json::to_vec(&chat_body(
                &format!("data:image/png;base64,{}", b64(&png_bomb(50_000, 50_000))),
                json!({}),
            ))
            .unwrap(),
            413,
        ),
        (
            "10000-page PDF",
            serde_json::to_vec(&chat_body(
                &format!(
                    "data:application/pdf;base64,{}",
                    b64(&pdf::synthetic_pdf(10_000, 10, 10))
                ),
                json!({}),
            ))
            .unwrap(),
            413,
        ),
        (
            "body over the limit",
            serde_json::to_vec(&chat_body(
                &format!("data:image/png;base64,{}", "A".repeat(5 << 20)),
                json!({}),
            ))
            .unwrap(),
            413,
        ),
        (
            "bad base64",
            serde_json::to_vec(&chat_body("data:image/png;base64,@@@", json!({}))).unwrap(),
            400,
        ),
        (
            "remote URL while disabled",
            serde_json::to_vec(&chat_body("http://127.0.0.1:9/x.png", json!({}))).unwrap(),
            400,
        ),
        (
            "local file outside the allowed folder",
            serde_json::to_vec(&chat_body("/etc/passwd", json!({}))).unwrap(),
            403,
        ),
        (
            "unknown mode",
            serde_json::to_vec(&{
                let mut g = good.clone();
                g["mode"] = json!("huge");
                g
            })
            .unwrap(),
            400,
        ),
        (
            "unknown model",
            serde_json::to_vec(&{
                let mut g = good.clone();
                g["model"] = json!("gpt-4");
                g
            })
            .unwrap(),
            404,
        ),
        (
            "max_tokens over the limit",
            serde_json::to_vec(&{
                let mut g = good.clone();
                g["max_tokens"] = json!(1_000_000);
                g
            })
            .unwrap(),
            400,
        ),
    ];
    for (what, body, want) in cases {
        let resp = client()
            .post(url(srv, "/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp
            .json_value()
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e})"));
        assert_eq!(status, want, "{what}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert_eq!(v["error"]["code"], want, "{what}");
    }
    let resp = client().get(url(srv, "/nope")).send().unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.json_value().unwrap()["error"].is_object());
    // still serving
    assert_eq!(
        client().get(url(srv, "/health")).send().unwrap().status(),
        200
    );
    post(srv, &good).unwrap();
    let m = metrics(srv);
    assert!(metric_outcome(&m, "bad_request") >= 10.0, "{m}");
}

#[test]
fn the_api_key_is_required_when_set_and_health_stays_open() {
    let srv = server(ServeConfig {
        api_key: Some("s3cret".into()),
        ..ServeConfig::default()
    });
    let c = client();
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let mut r = c.get(url(&srv, "/v1/models"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let resp = r.send().unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(
            resp.json_value().unwrap()["error"]["type"],
            "authentication_error"
        );
    }
    let v: Value = c
        .get(url(&srv, "/v1/models"))
        .header("authorization", "Bearer s3cret")
        .send()
        .unwrap()
        .json_value()
        .unwrap();
    assert_eq!(v["data"][0]["id"], "deepseek-ai/DeepSeek-OCR");
    assert_eq!(c.get(url(&srv, "/health")).send().unwrap().status(), 200);
    // local files are off unless a folder is allowed
    let resp = c
        .post(url(&srv, "/v1/chat/completions"))
        .header("authorization", "Bearer s3cret")
        .json(&chat_body("/etc/hostname", json!({})))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.json_value().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--allowed-local-media-path"));
    let m = c.get(url(&srv, "/metrics")).send().unwrap().text().unwrap();
    assert!(
        m.contains("ocr_requests_total{outcome=\"unauthorized\"} 3"),
        "{m}"
    );
    // no CORS headers unless asked for
    let resp = c
        .get(url(&srv, "/health"))
        .header("origin", "http://evil.example")
        .send()
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn local_files_are_served_only_under_the_allowed_folder() {
    let (srv, dir) = shared();
    let p = dir.join("page.png");
    let v = post(
        srv,
        &chat_body(
            &format!("file://{}", p.display()),
            json!({"max_tokens": 1, "mode": "tiny"}),
        ),
    )
    .unwrap();
    assert_eq!(
        (
            v["ocr"]["pages"][0]["width"].as_u64(),
            v["ocr"]["pages"][0]["height"].as_u64()
        ),
        (Some(50), Some(40))
    );
    for outside in [
        format!("{}/../x.png", dir.display()),
        "/etc/hostname".to_string(),
        dir.display().to_string(),
    ] {
        let (status, v) = post(srv, &chat_body(&outside, json!({"max_tokens": 1}))).unwrap_err();
        assert_eq!(status, 403, "{outside}: {v}");
    }
}
