//! The rows of a `COPY ... TO STDOUT` stream, read in place: binary tuples, and text lines.
//!
//! tokio-postgres' `BinaryCopyOutStream` allocates a row and checks each field's type on every
//! read; a verification pass reads every row of a table and its metadata this way, and that was
//! most of the pass's time in the client. Here a row is handed over as slices of the received
//! bytes, with its whole encoding (which a pass hashes as it is: self-delimiting, the same on
//! every node for the same values). Text lines are for a table's rows: PostgreSQL writes them
//! with the types' output functions, cheaper than casting each value to text for the binary
//! format.

use std::borrow::Cow;

use std::ops::Range;

use anyhow::{bail, Context, Result};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::CopyOutStream;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// One tuple: its fields (`None`: NULL) and its whole encoding.
pub(super) struct Tuple<'a> {
    bytes: &'a [u8],
    fields: &'a [Option<Range<usize>>],
}

impl<'a> Tuple<'a> {
    pub(super) fn get(&self, i: usize) -> Option<&'a [u8]> {
        self.fields.get(i).cloned().flatten().map(|r| &self.bytes[r])
    }

    /// A text field as `str`.
    pub(super) fn text(&self, i: usize) -> Result<Option<&'a str>> {
        self.get(i)
            .map(|bytes| std::str::from_utf8(bytes).context("a text field that is not UTF-8"))
            .transpose()
    }

    pub(super) fn encoding(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Calls `each` with every tuple of a binary-format `stream`, in order.
pub(super) async fn for_each(stream: CopyOutStream, mut each: impl FnMut(Tuple<'_>) -> Result<()>) -> Result<()> {
    let mut header_read = false;
    let mut ended = false;
    let mut fields: Vec<Option<Range<usize>>> = Vec::new();
    drive(stream, |data| {
        let mut at = 0;
        if !header_read {
            if data.len() < SIGNATURE.len() + 8 {
                return Ok(0);
            }
            if &data[..SIGNATURE.len()] != SIGNATURE {
                bail!("a binary COPY stream without its signature");
            }
            let extension = u32::from_be_bytes(read4(data, SIGNATURE.len() + 4)) as usize;
            if data.len() < SIGNATURE.len() + 8 + extension {
                return Ok(0);
            }
            at = SIGNATURE.len() + 8 + extension;
            header_read = true;
        }
        while !ended {
            let rest = &data[at..];
            if rest.len() < 2 {
                break;
            }
            let count = i16::from_be_bytes([rest[0], rest[1]]);
            if count == -1 {
                ended = true;
                at += 2;
                break;
            }
            let Some(length) = tuple_length(rest, count, &mut fields)? else {
                break;
            };
            each(Tuple {
                bytes: &rest[..length],
                fields: &fields,
            })?;
            at += length;
        }
        Ok(at)
    })
    .await?;
    if !ended {
        bail!("a binary COPY stream ended without its trailer");
    }
    Ok(())
}

/// Calls `each` with every line of a text-format `stream` (without its newline), in order.
pub(super) async fn for_each_line(stream: CopyOutStream, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    drive(stream, |data| {
        let mut at = 0;
        while let Some(end) = data[at..].iter().position(|&b| b == b'\n') {
            each(&data[at..at + end])?;
            at += end + 1;
        }
        Ok(at)
    })
    .await
}

/// Feeds `parse` the stream's bytes: it returns how many it consumed, whole rows; the rest waits
/// for the next message. (PostgreSQL sends a row a message, so in practice nothing waits and
/// nothing is copied.)
async fn drive(stream: CopyOutStream, mut parse: impl FnMut(&[u8]) -> Result<usize>) -> Result<()> {
    pin_mut!(stream);
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.try_next().await? {
        if pending.is_empty() {
            let used = parse(&chunk)?;
            pending.extend_from_slice(&chunk[used..]);
        } else {
            pending.extend_from_slice(&chunk);
            let used = parse(&pending)?;
            pending.drain(..used);
        }
    }
    if !pending.is_empty() {
        bail!("a COPY stream ended inside a row");
    }
    Ok(())
}

/// The length of the tuple at the start of `bytes` with `count` fields, its fields' ranges in
/// `fields`; `None` when it is not all there yet.
fn tuple_length(bytes: &[u8], count: i16, fields: &mut Vec<Option<Range<usize>>>) -> Result<Option<usize>> {
    let count = usize::try_from(count).context("a negative field count in a binary COPY tuple")?;
    fields.clear();
    let mut at = 2;
    for _ in 0..count {
        if bytes.len() < at + 4 {
            return Ok(None);
        }
        let length = i32::from_be_bytes(read4(bytes, at));
        at += 4;
        if length < 0 {
            fields.push(None);
            continue;
        }
        let end = at + length as usize;
        if bytes.len() < end {
            return Ok(None);
        }
        fields.push(Some(at..end));
        at = end;
    }
    Ok(Some(at))
}

/// A field of a text-format line as its value (`None`: NULL), its escapes undone.
pub(super) fn text_field(field: &[u8]) -> Result<Option<Cow<'_, str>>> {
    if field == b"\\N" {
        return Ok(None);
    }
    if !field.contains(&b'\\') {
        return Ok(Some(Cow::Borrowed(
            std::str::from_utf8(field).context("a COPY field that is not UTF-8")?,
        )));
    }
    let mut out = Vec::with_capacity(field.len());
    let mut bytes = field.iter();
    while let Some(&b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        out.push(match bytes.next() {
            Some(b'\\') => b'\\',
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'v') => 0x0b,
            other => bail!("an escape COPY does not write: \\{:?}", other.map(|&b| b as char)),
        });
    }
    Ok(Some(Cow::Owned(
        String::from_utf8(out).context("a COPY field that is not UTF-8")?,
    )))
}

fn read4(bytes: &[u8], at: usize) -> [u8; 4] {
    [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]
}

#[cfg(test)]
mod tests {
    use super::{text_field, tuple_length};

    #[test]
    fn a_text_field_is_unescaped_as_copy_escaped_it() {
        assert_eq!(text_field(b"plain").unwrap().as_deref(), Some("plain"));
        assert_eq!(text_field(b"\\N").unwrap(), None);
        assert_eq!(
            text_field(b"a\\\\b\\nc\\td\\re\\bf\\fg\\vh").unwrap().as_deref(),
            Some("a\\b\nc\td\re\u{8}f\u{c}g\u{b}h")
        );
        assert!(text_field(b"bad\\q").is_err());
        assert!(text_field(b"\xff").is_err());
    }

    #[test]
    fn a_tuple_is_read_whole_or_not_at_all() {
        // Two fields: 'ab' and NULL.
        let tuple = [0, 2, 0, 0, 0, 2, b'a', b'b', 0xff, 0xff, 0xff, 0xff];
        let mut fields = Vec::new();
        assert_eq!(tuple_length(&tuple, 2, &mut fields).unwrap(), Some(tuple.len()));
        assert_eq!(fields, vec![Some(6..8), None]);
        for cut in 2..tuple.len() {
            assert_eq!(
                tuple_length(&tuple[..cut], 2, &mut fields).unwrap(),
                None,
                "cut at {cut}"
            );
        }
        assert!(tuple_length(&tuple, -2, &mut fields).is_err());
    }
}
