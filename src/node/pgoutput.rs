//! A decoder for the pgoutput messages (protocol version 1) that the replication client hands
//! over as raw bytes. Begin, Commit and logical-decoding messages are decoded by the client itself.
//!
//! Every read is bounds-checked: a malformed message is a [`DecodeError`], never a panic.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("pgoutput message ends early: needed {needed} more bytes at offset {at}")]
    Truncated { at: usize, needed: usize },
    #[error("pgoutput string at offset {at} has no terminating NUL")]
    UnterminatedString { at: usize },
    #[error("pgoutput string at offset {at} is not UTF-8")]
    NotUtf8 { at: usize },
    #[error("unknown pgoutput {what} tag {tag:?}")]
    UnknownTag { what: &'static str, tag: char },
    #[error("pgoutput message is empty")]
    Empty,
    #[error("pgoutput count {count} at offset {at} is negative")]
    NegativeCount { at: usize, count: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    pub is_key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

/// One column of a row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value the update did not change; pgoutput does not send it.
    UnchangedToast,
    Text(String),
    Binary(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutput {
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    /// The transaction was replayed from a replication origin (by accord's apply, or another tool).
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<TupleValue>,
    },
    /// `old` is the previous row image (`REPLICA IDENTITY FULL`) or only its key columns.
    Update {
        relation: u32,
        old: Option<Vec<TupleValue>>,
        key_only: bool,
        new: Vec<TupleValue>,
    },
    Delete {
        relation: u32,
        old: Vec<TupleValue>,
        key_only: bool,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// Begin, Commit, Message and anything newer: handled elsewhere or not needed.
    Other(char),
}

pub fn decode(data: &[u8]) -> Result<PgOutput, DecodeError> {
    let mut r = Reader { data, at: 0 };
    let tag = r.u8()? as char;
    Ok(match tag {
        'R' => {
            let id = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = r.u8()?;
            let n = r.count16()?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                    is_key: flags & 1 == 1,
                });
            }
            PgOutput::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        'Y' => PgOutput::Type {
            oid: r.u32()?,
            namespace: r.string()?,
            name: r.string()?,
        },
        'O' => PgOutput::Origin {
            commit_lsn: r.u64()?,
            name: r.string()?,
        },
        'I' => {
            let relation = r.u32()?;
            r.expect(b'N', "insert tuple")?;
            PgOutput::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        'U' => {
            let relation = r.u32()?;
            let (old, key_only) = match r.u8()? {
                b'K' => (Some(r.tuple()?), true),
                b'O' => (Some(r.tuple()?), false),
                b'N' => {
                    r.at -= 1;
                    (None, false)
                }
                other => {
                    return Err(DecodeError::UnknownTag {
                        what: "update tuple",
                        tag: other as char,
                    })
                }
            };
            r.expect(b'N', "update new tuple")?;
            PgOutput::Update {
                relation,
                old,
                key_only,
                new: r.tuple()?,
            }
        }
        'D' => {
            let relation = r.u32()?;
            let key_only = match r.u8()? {
                b'K' => true,
                b'O' => false,
                other => {
                    return Err(DecodeError::UnknownTag {
                        what: "delete tuple",
                        tag: other as char,
                    })
                }
            };
            PgOutput::Delete {
                relation,
                old: r.tuple()?,
                key_only,
            }
        }
        'T' => {
            let n = r.u32()? as usize;
            let options = r.u8()?;
            // Each id takes 4 bytes: refuse a count the message cannot hold before allocating.
            r.need(n.saturating_mul(4))?;
            let relations = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            PgOutput::Truncate {
                relations,
                cascade: options & 1 == 1,
                restart_identity: options & 2 == 2,
            }
        }
        other => PgOutput::Other(other),
    })
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.data.len().saturating_sub(self.at) < n {
            return Err(if self.data.is_empty() {
                DecodeError::Empty
            } else {
                DecodeError::Truncated {
                    at: self.at,
                    needed: n - self.data.len().saturating_sub(self.at),
                }
            });
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        self.need(n)?;
        let slice = &self.data[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn count16(&mut self) -> Result<usize, DecodeError> {
        let at = self.at;
        let n = i16::from_be_bytes(self.array()?);
        usize::try_from(n).map_err(|_| DecodeError::NegativeCount { at, count: n.into() })
    }

    fn expect(&mut self, tag: u8, what: &'static str) -> Result<(), DecodeError> {
        match self.u8()? {
            t if t == tag => Ok(()),
            other => Err(DecodeError::UnknownTag {
                what,
                tag: other as char,
            }),
        }
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let start = self.at;
        let len = self.data[start.min(self.data.len())..]
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString { at: start })?;
        let bytes = self.take(len)?;
        self.at += 1; // the NUL, found above
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8 { at: start })
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.count16()?;
        // Each column takes at least its one-byte kind.
        self.need(n)?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let at = self.at;
                    let len = self.i32()?;
                    let len = usize::try_from(len).map_err(|_| DecodeError::NegativeCount { at, count: len.into() })?;
                    let bytes = self.take(len)?;
                    if kind == b't' {
                        TupleValue::Text(String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8 { at })?)
                    } else {
                        TupleValue::Binary(bytes.to_vec())
                    }
                }
                other => {
                    return Err(DecodeError::UnknownTag {
                        what: "tuple column",
                        tag: other as char,
                    })
                }
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn tuple(out: &mut Vec<u8>, values: &[Option<&str>]) {
        out.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                None => out.push(b'n'),
                Some("<toast>") => out.push(b'u'),
                Some(s) => {
                    out.push(b't');
                    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
    }

    #[test]
    fn relation_and_row_messages_decode() {
        let mut rel = vec![b'R'];
        rel.extend_from_slice(&16384u32.to_be_bytes());
        string(&mut rel, "shop");
        string(&mut rel, "products");
        rel.push(b'f');
        rel.extend_from_slice(&2i16.to_be_bytes());
        rel.push(1);
        string(&mut rel, "id");
        rel.extend_from_slice(&20u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        rel.push(0);
        string(&mut rel, "name");
        rel.extend_from_slice(&25u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        let PgOutput::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(r.qualified_name(), "shop.products");
        assert!(r.columns[0].is_key && !r.columns[1].is_key);

        let mut upd = vec![b'U'];
        upd.extend_from_slice(&16384u32.to_be_bytes());
        upd.push(b'O');
        tuple(&mut upd, &[Some("1"), Some("<toast>")]);
        upd.push(b'N');
        tuple(&mut upd, &[Some("1"), None]);
        assert_eq!(
            decode(&upd).unwrap(),
            PgOutput::Update {
                relation: 16384,
                old: Some(vec![TupleValue::Text("1".into()), TupleValue::UnchangedToast]),
                key_only: false,
                new: vec![TupleValue::Text("1".into()), TupleValue::Null],
            }
        );
    }

    #[test]
    fn every_truncation_of_a_message_is_an_error_not_a_panic() {
        let mut del = vec![b'D'];
        del.extend_from_slice(&7u32.to_be_bytes());
        del.push(b'O');
        tuple(&mut del, &[Some("42"), Some("hello")]);
        decode(&del).unwrap();
        for end in 0..del.len() {
            assert!(decode(&del[..end]).is_err(), "prefix of {end} bytes decoded");
        }
    }

    proptest::proptest! {
        // 2,000 cases by default; PROPTEST_CASES=1000000 runs it for a while.
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000),
            ..Default::default()
        })]

        /// Whatever arrives, decoding returns; the first byte drawn from the tags that matter.
        #[test]
        fn no_input_panics_the_decoder(
            tag in proptest::sample::select(b"RYOIUDTBCMx".to_vec()),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let mut message = vec![tag];
            message.extend(body);
            let _ = decode(&message);
        }
    }

    #[test]
    fn absurd_counts_are_refused_without_allocating() {
        let mut t = vec![b'T'];
        t.extend_from_slice(&u32::MAX.to_be_bytes());
        t.push(0);
        assert!(matches!(decode(&t), Err(DecodeError::Truncated { .. })));
        let mut i = vec![b'I'];
        i.extend_from_slice(&1u32.to_be_bytes());
        i.push(b'N');
        i.extend_from_slice(&(-3i16).to_be_bytes());
        assert!(matches!(decode(&i), Err(DecodeError::NegativeCount { .. })));
    }
}
