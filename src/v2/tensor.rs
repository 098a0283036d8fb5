//! Tensor elements on the wire: datatypes, raw little-endian buffers, BYTES elements
//! (length-prefixed in raw form, base64 in JSON), and JSON `data` arrays (flat or nested).
//!
//! Every size is checked against the bytes actually received before anything is allocated for
//! it, so a declared shape or length can never make the server allocate beyond the body.

use std::fmt;

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};

use super::Data;

/// The protocol's tensor datatypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bf16,
    Bytes,
}

impl DataType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOL" => Self::Bool,
            "UINT8" => Self::Uint8,
            "UINT16" => Self::Uint16,
            "UINT32" => Self::Uint32,
            "UINT64" => Self::Uint64,
            "INT8" => Self::Int8,
            "INT16" => Self::Int16,
            "INT32" => Self::Int32,
            "INT64" => Self::Int64,
            "FP16" => Self::Fp16,
            "FP32" => Self::Fp32,
            "FP64" => Self::Fp64,
            "BF16" => Self::Bf16,
            "BYTES" => Self::Bytes,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::Uint8 => "UINT8",
            Self::Uint16 => "UINT16",
            Self::Uint32 => "UINT32",
            Self::Uint64 => "UINT64",
            Self::Int8 => "INT8",
            Self::Int16 => "INT16",
            Self::Int32 => "INT32",
            Self::Int64 => "INT64",
            Self::Fp16 => "FP16",
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
            Self::Bf16 => "BF16",
            Self::Bytes => "BYTES",
        }
    }

    /// Bytes per element in raw form (None for BYTES, whose elements vary).
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::Uint8 | Self::Int8 => 1,
            Self::Uint16 | Self::Int16 | Self::Fp16 | Self::Bf16 => 2,
            Self::Uint32 | Self::Int32 | Self::Fp32 => 4,
            Self::Uint64 | Self::Int64 | Self::Fp64 => 8,
            Self::Bytes => return None,
        })
    }
}

/// `count` floats from a float tensor's data, converted from FP16/BF16 when raw.
pub fn floats(datatype: DataType, data: &Data, count: usize) -> Result<Vec<f32>, String> {
    match data {
        Data::Numbers(v) if v.len() == count => Ok(v.clone()),
        Data::Numbers(v) => Err(format!("{} elements for a shape of {count}", v.len())),
        Data::Raw(raw) => {
            let size = datatype.size().unwrap_or(1);
            let expected = count.checked_mul(size);
            if expected != Some(raw.len()) {
                return Err(format!(
                    "{} bytes of {} data for a shape of {count} elements ({} bytes expected)",
                    raw.len(),
                    datatype.name(),
                    expected.map_or_else(|| "too many".to_owned(), |e| e.to_string())
                ));
            }
            Ok(match datatype {
                DataType::Fp16 => raw
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                DataType::Bf16 => raw
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                _ => raw
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            })
        }
        Data::Elements(_) => Err("strings where numbers were expected".into()),
        Data::Missing => Err("no data (neither `data` nor binary data)".into()),
    }
}

/// `count` BYTES elements from their data.
pub fn elements(data: &Data, count: usize) -> Result<Vec<Bytes>, String> {
    match data {
        Data::Elements(v) if v.len() == count => Ok(v.clone()),
        Data::Elements(v) => Err(format!("{} elements for a shape of {count}", v.len())),
        Data::Raw(raw) => {
            let v = split_bytes(raw)?;
            if v.len() != count {
                return Err(format!("{} elements for a shape of {count}", v.len()));
            }
            Ok(v)
        }
        Data::Numbers(_) => Err("numbers where BYTES elements (strings) were expected".into()),
        Data::Missing => Err("no data (neither `data` nor binary data)".into()),
    }
}

/// BYTES elements in raw form: each a 4-byte little-endian length and that many bytes.
pub fn split_bytes(raw: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < raw.len() {
        let Some(head) = raw.get(at..at + 4) else {
            return Err(format!(
                "BYTES element {} is truncated: {} bytes left where a 4-byte length was expected",
                out.len(),
                raw.len() - at
            ));
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let start = at + 4;
        if len > raw.len() - start {
            return Err(format!(
                "BYTES element {} declares {len} bytes; {} are left",
                out.len(),
                raw.len() - start
            ));
        }
        out.push(raw.slice(start..start + len));
        at = start + len;
    }
    Ok(out)
}

const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const BASE64_URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// An element made only of base64 characters (standard or URL-safe alphabet, padded or not) is
/// decoded; anything else (an image file's bytes) is taken as it is. No image format's file
/// is made of base64 characters only: each begins with bytes outside that alphabet.
pub fn maybe_base64(element: Bytes) -> Result<Bytes, String> {
    let text = element.trim_ascii();
    let is_b64 =
        |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'-' | b'_' | b'=');
    if text.is_empty() || !text.iter().all(is_b64) {
        return Ok(element);
    }
    let url_safe = text.iter().any(|c| matches!(c, b'-' | b'_'));
    let decoded = if url_safe {
        BASE64_URL.decode(text)
    } else {
        BASE64.decode(text)
    };
    decoded
        .map(Bytes::from)
        .map_err(|e| format!("neither an image file nor valid base64 ({e})"))
}

/// A JSON `data` array, flat or nested (row-major), of numbers or of strings. Its elements are
/// collected as they are read: no tree of JSON values is built.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonData {
    Numbers(Vec<f32>),
    Strings(Vec<String>),
}

impl JsonData {
    pub fn into_data(self) -> Data {
        match self {
            Self::Numbers(v) => Data::Numbers(v),
            Self::Strings(v) => Data::Elements(v.into_iter().map(Bytes::from).collect()),
        }
    }
}

/// Nested arrays deeper than this are refused (a shape has at most a handful of dimensions).
const MAX_DEPTH: usize = 16;

#[derive(Default)]
struct Collector {
    numbers: Vec<f32>,
    strings: Vec<String>,
}

struct Level<'a> {
    out: &'a mut Collector,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Level<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers or strings, flat or nested")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "`data` is nested deeper than {MAX_DEPTH} levels"
            )));
        }
        while seq
            .next_element_seed(Level {
                out: &mut *self.out,
                depth: self.depth + 1,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.number(v as f32)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.number(v as f32)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.number(v as f32)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.string(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.string(v)
    }
}

impl Level<'_> {
    fn number<E: de::Error>(self, v: f32) -> Result<(), E> {
        if self.depth == 0 {
            return Err(E::custom("`data` must be an array"));
        }
        if !self.out.strings.is_empty() {
            return Err(E::custom("`data` mixes numbers and strings"));
        }
        self.out.numbers.push(v);
        Ok(())
    }

    fn string<E: de::Error>(self, v: String) -> Result<(), E> {
        if self.depth == 0 {
            return Err(E::custom("`data` must be an array"));
        }
        if !self.out.numbers.is_empty() {
            return Err(E::custom("`data` mixes numbers and strings"));
        }
        self.out.strings.push(v);
        Ok(())
    }
}

impl<'de> serde::Deserialize<'de> for JsonData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Collector::default();
        Level {
            out: &mut out,
            depth: 0,
        }
        .deserialize(d)?;
        Ok(if out.strings.is_empty() {
            Self::Numbers(out.numbers)
        } else {
            Self::Strings(out.strings)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose;

    #[test]
    fn json_data_flat_and_nested() {
        let d: JsonData = serde_json::from_str("[1, 2.5, -3]").unwrap();
        assert_eq!(d, JsonData::Numbers(vec![1.0, 2.5, -3.0]));
        let d: JsonData = serde_json::from_str("[[[1, 2], [3, 4]], [[5, 6], [7, 8]]]").unwrap();
        assert_eq!(d, JsonData::Numbers((1..=8).map(|i| i as f32).collect()));
        let d: JsonData = serde_json::from_str(r#"[["aGk="], ["eA"]]"#).unwrap();
        assert_eq!(d, JsonData::Strings(vec!["aGk=".into(), "eA".into()]));
        for bad in [
            "1",
            r#""x""#,
            "[1, \"a\"]",
            "[\"a\", 1]",
            "[true]",
            "[null]",
            "{\"a\": 1}",
            &format!("{}1{}", "[".repeat(40), "]".repeat(40)),
        ] {
            assert!(serde_json::from_str::<JsonData>(bad).is_err(), "{bad}");
        }
        let d: JsonData = serde_json::from_str("[]").unwrap();
        assert_eq!(d, JsonData::Numbers(vec![]));
    }

    #[test]
    fn raw_floats_check_their_size_and_convert() {
        let raw: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let data = Data::Raw(Bytes::from(raw));
        assert_eq!(floats(DataType::Fp32, &data, 2).unwrap(), vec![1.5, -2.0]);
        assert!(floats(DataType::Fp32, &data, 3).is_err());
        assert!(floats(DataType::Fp32, &data, usize::MAX).is_err());
        let h: Vec<u8> = [half::f16::from_f32(0.5), half::f16::from_f32(-4.0)]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        assert_eq!(
            floats(DataType::Fp16, &Data::Raw(h.into()), 2).unwrap(),
            vec![0.5, -4.0]
        );
        let b: Vec<u8> = [half::bf16::from_f32(1.0), half::bf16::from_f32(-0.25)]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        assert_eq!(
            floats(DataType::Bf16, &Data::Raw(b.into()), 2).unwrap(),
            vec![1.0, -0.25]
        );
        assert!(floats(DataType::Fp32, &Data::Missing, 1).is_err());
    }

    #[test]
    fn length_prefixed_elements() {
        let mut raw = Vec::new();
        for e in [&b"abc"[..], b"", b"\xff\xd8"] {
            raw.extend_from_slice(&(e.len() as u32).to_le_bytes());
            raw.extend_from_slice(e);
        }
        let v = split_bytes(&Bytes::from(raw.clone())).unwrap();
        assert_eq!(v, vec![&b"abc"[..], b"", b"\xff\xd8"]);
        // Truncated length, length beyond the end, a huge declared length.
        assert!(split_bytes(&Bytes::from(raw[..raw.len() - 1].to_vec())).is_err());
        assert!(split_bytes(&Bytes::from_static(&[1, 0])).is_err());
        assert!(split_bytes(&Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 1])).is_err());
        assert_eq!(split_bytes(&Bytes::new()).unwrap().len(), 0);
    }

    #[test]
    fn base64_or_as_is() {
        let jpeg = Bytes::from_static(b"\xff\xd8\xff\xe0rest");
        assert_eq!(maybe_base64(jpeg.clone()).unwrap(), jpeg);
        let png = Bytes::from_static(b"\x89PNG\r\n\x1a\n");
        assert_eq!(maybe_base64(png.clone()).unwrap(), png);
        let encoded = general_purpose::STANDARD.encode(&jpeg);
        assert_eq!(maybe_base64(Bytes::from(encoded.clone())).unwrap(), jpeg);
        let unpadded = encoded.trim_end_matches('=').to_owned();
        assert_eq!(maybe_base64(Bytes::from(unpadded)).unwrap(), jpeg);
        let url = general_purpose::URL_SAFE.encode(b"\xfb\xff\xfe");
        assert!(url.contains('-') || url.contains('_'));
        assert_eq!(
            maybe_base64(Bytes::from(url)).unwrap(),
            &b"\xfb\xff\xfe"[..]
        );
        assert!(
            maybe_base64(Bytes::from_static(b"abcde")).is_err(),
            "not valid base64"
        );
    }
}
