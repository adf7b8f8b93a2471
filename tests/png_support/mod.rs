//! Crafted PNG files for the bad-input tests of `ocr` and `serve`: a header with no pixel data,
//! and a "bomb" (a huge claimed size over a few bytes of image data). Written by hand (chunk
//! framing and CRC-32), since a PNG encoder would refuse to make them.
#![allow(dead_code)]

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Appends one chunk: length, type, data, CRC of type + data.
pub fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A PNG whose header claims `w` x `h` and which holds no pixel data at all.
pub fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    png_chunk(&mut out, b"IHDR", &ihdr);
    out
}

/// A well-formed PNG claiming `w` x `h` whose image data is a few bytes (decoding it would
/// allocate w * h * 3 bytes).
pub fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut out = png_header_only(w, h);
    png_chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    );
    png_chunk(&mut out, b"IEND", &[]);
    out
}
