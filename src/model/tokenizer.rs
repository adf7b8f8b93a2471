//! The tokenizer: the model folder's `tokenizer.json` through the `tokenizers` crate (the same
//! Rust code transformers' `LlamaTokenizerFast` runs), used as `infer()` uses it:
//! `tokenizer.encode(text, add_special_tokens=False)` for the prompt's pieces, and `decode`
//! with special tokens kept (`NoEOSTextStreamer(skip_special_tokens=False)`) so the grounding
//! tags `<|ref|>`/`<|det|>` reach the parser.
//!
//! Owns: text <-> ids. Does not own: the prompt layout (`preprocess`).
//!
//! [`OcrTokenizer::byte_level`] is a built-in stand-in for runs on synthetic weights: one token
//! per byte (GPT-2's byte-to-char map, ids 3..=258) plus DeepSeek-OCR's special tokens at their
//! real ids. It exists so `ocr --synthetic` works without any file; real runs use the model's
//! own `tokenizer.json`.

use std::path::Path;

use tokenizers::Tokenizer;

/// DeepSeek-OCR's special tokens this code relies on, with their ids (`tokenizer_config.json`).
pub const OCR_TOKENS: [(&str, u32); 12] = [
    ("<｜begin▁of▁sentence｜>", 0),
    ("<｜end▁of▁sentence｜>", 1),
    ("<｜▁pad▁｜>", 2),
    ("<image>", 128815),
    ("<|ref|>", 128816),
    ("<|/ref|>", 128817),
    ("<|det|>", 128818),
    ("<|/det|>", 128819),
    ("<|grounding|>", 128820),
    ("<td>", 128821),
    ("</td>", 128822),
    ("<|User|>", 128825),
];

/// `eos_token_id`.
pub const EOS_ID: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "{path}: not found; a DeepSeek-OCR model folder holds tokenizer.json next to config.json \
         (copy it from the checkpoint, or pass --tokenizer FILE)"
    )]
    Missing { path: String },
    #[error("{path}: not a usable tokenizer.json ({message}); use the checkpoint's own file")]
    Unreadable { path: String, message: String },
    #[error("the tokenizer failed on the prompt: {0}")]
    Encode(String),
    #[error("the tokenizer failed to decode the output: {0}")]
    Decode(String),
}

pub struct OcrTokenizer {
    inner: Tokenizer,
    /// Where it came from, for messages.
    pub source: String,
}

impl OcrTokenizer {
    /// `DIR/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let name = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TokenizerError::Missing { path: name })
            }
            Err(e) => {
                return Err(TokenizerError::Unreadable {
                    path: name,
                    message: e.to_string(),
                })
            }
        };
        Self::from_json(&text, &name)
    }

    pub fn from_json(json: &str, name: &str) -> Result<Self, TokenizerError> {
        let inner =
            Tokenizer::from_bytes(json.as_bytes()).map_err(|e| TokenizerError::Unreadable {
                path: name.to_string(),
                message: e.to_string(),
            })?;
        Ok(Self {
            inner,
            source: name.to_string(),
        })
    }

    /// The built-in byte-level stand-in (see the module docs).
    pub fn byte_level() -> Self {
        let json = byte_level_json();
        // Built from constants: it always parses (a unit test holds it to that).
        match Self::from_json(&json.to_string(), "<built-in byte-level tokenizer>") {
            Ok(t) => t,
            Err(e) => panic!("the built-in tokenizer does not load: {e}"),
        }
    }

    /// `tokenizer.encode(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// DeepSeek-OCR's special tokens this tokenizer lacks or numbers differently, as messages.
    /// The model still runs (image positions are marked by the mask, not the ids), but a
    /// `<|grounding|>` that is not one token is not the prompt the model was trained on.
    pub fn check_ocr_tokens(&self) -> Vec<String> {
        OCR_TOKENS
            .iter()
            .filter_map(|&(tok, id)| match self.token_to_id(tok) {
                Some(got) if got == id => None,
                Some(got) => Some(format!("{tok} is id {got}, DeepSeek-OCR's is {id}")),
                None => Some(format!("{tok} (id {id}) is missing")),
            })
            .collect()
    }
}

/// Incremental decoding for streaming: the text of all ids so far, printed as it grows.
/// Byte-level BPE can split a UTF-8 character across tokens: text ending in U+FFFD is held back
/// until the character completes (as transformers' `TextStreamer` does).
pub struct StreamDecoder<'t> {
    tok: &'t OcrTokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tok: &'t OcrTokenizer) -> Self {
        Self {
            tok,
            ids: vec![],
            printed: 0,
        }
    }

    /// Adds a token, returns the new text that can be shown now.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, false)?;
        if text.ends_with('\u{FFFD}')
            || text.len() < self.printed
            || !text.is_char_boundary(self.printed)
        {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }

    /// Whatever is left (a dangling partial character at the end).
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let text = self.tok.decode(&self.ids, false)?;
        if text.len() <= self.printed || !text.is_char_boundary(self.printed) {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_chars() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    out
}

fn byte_level_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (b, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), (3 + b).into());
    }
    let mut added = vec![];
    for &(tok, id) in &OCR_TOKENS {
        vocab.insert(tok.to_string(), id.into());
        added.push(serde_json::json!({
            "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_tokenizer_has_the_ocr_tokens_and_round_trips_bytes() {
        let t = OcrTokenizer::byte_level();
        assert!(
            t.check_ocr_tokens().is_empty(),
            "{:?}",
            t.check_ocr_tokens()
        );
        let ids = t.encode("\n<|grounding|>Héllo 文").unwrap();
        assert_eq!(ids[0], 3 + b'\n' as u32);
        assert_eq!(ids[1], 128820);
        assert_eq!(t.decode(&ids, false).unwrap(), "\n<|grounding|>Héllo 文");
        assert_eq!(t.decode(&ids, true).unwrap(), "\nHéllo 文");
    }

    #[test]
    fn streaming_holds_back_split_characters() {
        let t = OcrTokenizer::byte_level();
        let ids = t.encode("a文b").unwrap();
        assert_eq!(ids.len(), 5); // a, 3 bytes, b
        let mut s = StreamDecoder::new(&t);
        let parts: Vec<String> = ids.iter().map(|&i| s.push(i).unwrap()).collect();
        assert_eq!(parts, vec!["a", "", "", "文", "b"]);
        assert_eq!(s.finish().unwrap(), "");
    }

    #[test]
    fn a_missing_tokenizer_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = OcrTokenizer::from_dir(dir.path()).err().unwrap();
        assert!(matches!(e, TokenizerError::Missing { .. }));
        assert!(e.to_string().contains("tokenizer.json: not found"), "{e}");
        std::fs::write(dir.path().join("tokenizer.json"), "{\"not\": 1}").unwrap();
        let e = OcrTokenizer::from_dir(dir.path()).err().unwrap();
        assert!(matches!(e, TokenizerError::Unreadable { .. }), "{e}");
    }
}
