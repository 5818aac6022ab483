//! Framing of engine messages on a QUIC stream: a 4-byte big-endian length, then the message as
//! MessagePack with named fields (a map per struct), so a field added later with a serde default is
//! read by older nodes. The length is checked against a limit before anything is allocated.

use accord_engine::Message;
use thiserror::Error;

/// Default limit on one frame: 64 MiB. A batch of `ReplicationConfig::max_batch` changes stays far
/// below it; the limit exists so a broken or hostile peer cannot make a node allocate without bound.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// The length prefix.
pub const HEADER_LEN: usize = 4;

/// How deep a frame may nest. The engine's messages nest a dozen levels; rmp-serde's default of 1024
/// would let a hostile frame recurse deep enough to matter on a task's stack.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("frame does not decode as a message: {0}")]
    Undecodable(String),
    #[error("message does not encode: {0}")]
    Encode(String),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadError),
}

/// Encodes `message` as one frame, header included.
pub fn encode(message: &Message, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    rmp_serde::encode::write_named(&mut buf, message).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = buf.len() - HEADER_LEN;
    let header = u32::try_from(len)
        .ok()
        .filter(|&l| l as usize <= max)
        .ok_or(FrameError::TooLarge { len: len as u64, max })?;
    buf[..HEADER_LEN].copy_from_slice(&header.to_be_bytes());
    Ok(buf)
}

/// Decodes a frame's payload (without its header).
pub fn decode(payload: &[u8]) -> Result<Message, FrameError> {
    // A reader over `&[u8]` advances the slice, so what is left afterwards is the trailing part.
    let mut de = rmp_serde::Deserializer::new(payload);
    de.set_max_depth(MAX_DEPTH);
    let message = serde::Deserialize::deserialize(&mut de).map_err(|e| FrameError::Undecodable(e.to_string()))?;
    let rest = de.get_ref().len();
    if rest != 0 {
        return Err(FrameError::Undecodable(format!("{rest} bytes after the message")));
    }
    Ok(message)
}

/// The payload length a header announces, checked against `max`.
pub fn payload_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len: len as u64, max });
    }
    Ok(len)
}

/// Reads the next frame. `Ok(None)` when the peer finished the stream between frames.
pub async fn read(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<Message>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = payload_len(header, max)?;
    let mut payload = vec![0u8; len];
    match recv.read_exact(&mut payload).await {
        Ok(()) => decode(&payload).map(Some),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accord_engine::{Hlc, NodeId};

    #[test]
    fn a_message_round_trips_by_field_name() {
        let message = Message::Ping {
            hlc: Hlc::new(5, 1, NodeId(3)),
            head: 9,
        };
        let frame = encode(&message, DEFAULT_MAX_FRAME).unwrap();
        let len = payload_len(frame[..HEADER_LEN].try_into().unwrap(), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(len, frame.len() - HEADER_LEN);
        let payload = &frame[HEADER_LEN..];
        // Named encoding: the field names are in the bytes.
        assert!(payload.windows(8).any(|w| w == b"physical"));
        assert_eq!(decode(payload).unwrap(), message);
    }

    #[test]
    fn limits_and_garbage_are_errors_not_panics() {
        let ack = Message::Ack { applied: 1 };
        assert!(matches!(encode(&ack, 3), Err(FrameError::TooLarge { .. })));
        assert!(matches!(
            payload_len(1025u32.to_be_bytes(), 1024),
            Err(FrameError::TooLarge { len: 1025, max: 1024 })
        ));
        for garbage in [&b""[..], b"\xff\xff\xff", b"\x81\xa3Ack", b"\xdd\xff\xff\xff\xff"] {
            assert!(
                matches!(decode(garbage), Err(FrameError::Undecodable(_))),
                "{garbage:?}"
            );
        }
        // Deep nesting is refused, not recursed into.
        let deep: Vec<u8> = std::iter::repeat_n(0x91u8, 100_000).collect();
        assert!(matches!(decode(&deep), Err(FrameError::Undecodable(_))));
        let mut trailing = encode(&ack, 1024).unwrap()[HEADER_LEN..].to_vec();
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(FrameError::Undecodable(_))));
    }

    /// Fuzzing by property: any bytes, and valid frames cut short or with bytes flipped, decode to
    /// a message or an error, never a panic. `PROPTEST_CASES=1000000 cargo test -p accord-transport
    /// frame_decoding` runs it for a while (CI runs the default 256 cases).
    mod frame_decoding {
        use super::*;
        use accord_engine::{Hello, Hlc, NodeId, PROTOCOL_VERSION};
        use proptest::prelude::*;

        fn seeds() -> Vec<Vec<u8>> {
            let hello = Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                cluster: "c".into(),
                node: NodeId(2),
                fingerprint: "f".repeat(64),
                hlc: Hlc::new(1_700_000_000_000_000, 3, NodeId(2)),
                applied_yours: 41,
            });
            [hello, Message::Ack { applied: 7 }, Message::Batch(Vec::new())]
                .iter()
                .map(|m| encode(m, DEFAULT_MAX_FRAME).unwrap()[HEADER_LEN..].to_vec())
                .collect()
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode(&bytes);
            }

            #[test]
            fn damaged_frames_never_panic(
                seed in 0usize..3,
                cut in any::<prop::sample::Index>(),
                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            ) {
                let mut bytes = seeds()[seed].clone();
                for (at, value) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = value;
                }
                let len = cut.index(bytes.len() + 1);
                if let Ok(message) = decode(&bytes[..len]) {
                    // Whatever decodes is a message that encodes again.
                    prop_assert!(encode(&message, DEFAULT_MAX_FRAME).is_ok());
                }
            }
        }
    }
}
