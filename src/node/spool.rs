//! A source transaction too large for the receiver's memory, kept on disk by its peer's applier
//! until its end arrives (`accord_engine::Handout::Spool`); it is then read back a segment at a
//! time and applied in one local transaction (`Applier::apply_spooled`).
//!
//! The file is anonymous (unlinked at creation), so a crash or a stop leaves nothing behind. Nothing
//! in it is acknowledged: after a restart the peer resends the transaction from the durable
//! applied position, which is before it.

use std::io::SeekFrom;
use std::path::Path;

use accord_engine::RowChange;
use anyhow::{bail, Context, Result};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};

/// A chunk longer than this is a corrupt file, not a chunk (`ApplyQueue` spools a few tens of MB
/// at a time).
const MAX_CHUNK_BYTES: u64 = 1 << 32;

pub struct Spool {
    file: File,
    chunks: u64,
    changes: u64,
    bytes: u64,
}

impl Spool {
    /// An empty spool in `dir` (the system's temporary directory when `None`).
    pub fn create(dir: Option<&Path>) -> Result<Spool> {
        let file = match dir {
            Some(dir) => tempfile::tempfile_in(dir)
                .with_context(|| format!("cannot create a spool file in {}", dir.display()))?,
            None => tempfile::tempfile().context("cannot create a spool file in the temporary directory")?,
        };
        Ok(Spool {
            file: File::from_std(file),
            chunks: 0,
            changes: 0,
            bytes: 0,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    /// Changes spooled.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends a chunk of the transaction, in order after the ones before. Encoded with field
    /// names, as on the wire: fields skipped when empty would shift a positional encoding.
    pub async fn append(&mut self, changes: &[RowChange]) -> Result<()> {
        let payload = rmp_serde::to_vec_named(changes).context("cannot encode changes for the spool")?;
        let len = payload.len() as u64;
        self.file
            .seek(SeekFrom::End(0))
            .await
            .context("cannot seek in the spool file")?;
        self.file
            .write_all(&len.to_be_bytes())
            .await
            .context("cannot write the spool file")?;
        self.file
            .write_all(&payload)
            .await
            .context("cannot write the spool file")?;
        self.file.flush().await.context("cannot write the spool file")?;
        self.chunks += 1;
        self.changes += changes.len() as u64;
        self.bytes += 8 + len;
        Ok(())
    }

    /// Reads the chunks back from the first, in order.
    pub async fn read(&mut self) -> Result<SpoolReader<'_>> {
        self.file
            .seek(SeekFrom::Start(0))
            .await
            .context("cannot seek in the spool file")?;
        Ok(SpoolReader {
            file: BufReader::new(&mut self.file),
            left: self.chunks,
        })
    }
}

pub struct SpoolReader<'a> {
    file: BufReader<&'a mut File>,
    left: u64,
}

impl SpoolReader<'_> {
    /// The next chunk, `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<RowChange>>> {
        if self.left == 0 {
            return Ok(None);
        }
        let len = self.file.read_u64().await.context("cannot read the spool file")?;
        if len > MAX_CHUNK_BYTES {
            bail!("the spool file is corrupt: a chunk of {len} bytes");
        }
        let mut payload = vec![0; len as usize];
        self.file
            .read_exact(&mut payload)
            .await
            .context("cannot read the spool file")?;
        self.left -= 1;
        let changes = rmp_serde::from_slice(&payload).context("the spool file is corrupt: a chunk does not decode")?;
        Ok(Some(changes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accord_engine::{ChangeKind, Hlc, NodeId, RowKey, RowMeta, RowState, Value};

    fn change(seq: u64) -> RowChange {
        RowChange {
            shape: None,
            table: "s.t".into(),
            key: RowKey(vec![Value::Int(seq as i64)]),
            kind: ChangeKind::Insert,
            origin: NodeId(2),
            stamp: Hlc::new(1_000 + seq, 0, NodeId(2)),
            seq,
            tx_last: 100,
            // Empty, so skipped when serialized: a positional encoding does not read back.
            builds_on: if seq.is_multiple_of(2) {
                vec![(NodeId(3), 7)]
            } else {
                Vec::new()
            },
            row: RowState {
                meta: RowMeta::absent(),
                values: Vec::new(),
            },
            closures: Vec::new(),
        }
    }

    #[tokio::test]
    async fn chunks_come_back_in_order_as_often_as_they_are_read() {
        let mut spool = Spool::create(None).unwrap();
        assert!(spool.is_empty());
        let first: Vec<RowChange> = (1..=3).map(change).collect();
        let second: Vec<RowChange> = (4..=4).map(change).collect();
        spool.append(&first).await.unwrap();
        spool.append(&second).await.unwrap();
        assert_eq!(spool.changes(), 4);
        for _ in 0..2 {
            let mut reader = spool.read().await.unwrap();
            assert_eq!(reader.next().await.unwrap(), Some(first.clone()));
            assert_eq!(reader.next().await.unwrap(), Some(second.clone()));
            assert_eq!(reader.next().await.unwrap(), None);
        }
    }
}
