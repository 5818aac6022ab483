//! `accord verify`: whether the nodes hold the same rows and the same metadata, proven at a cut
//! every node has applied, while writes go on.
//!
//! A *cut* gives, per origin, the last of its changes every node had applied when the cut was
//! taken. A row whose metadata's clock and deletes lie within the cut (and whose stored version
//! is the one its metadata accounts for) is *settled*: every node has applied every write it
//! absorbed, and a node with a later write to it would have that write's dot beyond the cut. So
//! settled rows must be equal everywhere, and a difference among them is a real one. Rows not
//! settled on some node are *in flight*: set aside and checked again under a later cut.
//!
//! Each node summarises its rows (`RowSummary`: a hash of the key, a digest of the values and
//! the metadata by column name) and answers for ranges of the key-hash space with a count and
//! the sum of the digests (`RangeSummary`). The coordinator (`Descent`) compares the nodes'
//! summaries of a few ranges, splits those that differ, and asks for the rows only of small
//! ranges that differ: the data exchanged grows with the differences times the log of the rows.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::hlc::NodeId;
use crate::schema::TableDef;
use crate::state::{ColumnMeta, RowMeta};

/// Per origin, the last of its changes every node had applied (sorted by origin).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyCut(pub Vec<(NodeId, u64)>);

impl VerifyCut {
    /// The cut of what every node reported applied: per origin, the least position; an origin
    /// a node did not report counts as 0 there (it has applied none of its changes).
    pub fn of(reports: &[Vec<(NodeId, u64)>]) -> VerifyCut {
        let origins: BTreeSet<NodeId> = reports.iter().flatten().map(|(o, _)| *o).collect();
        VerifyCut(
            origins
                .into_iter()
                .map(|origin| {
                    let least = reports
                        .iter()
                        .map(|r| r.iter().find(|(o, _)| *o == origin).map_or(0, |(_, s)| *s))
                        .min()
                        .unwrap_or(0);
                    (origin, least)
                })
                .collect(),
        )
    }

    pub fn through(&self, origin: NodeId) -> u64 {
        self.0
            .binary_search_by_key(&origin, |(o, _)| *o)
            .map(|i| self.0[i].1)
            .unwrap_or(0)
    }

    /// Whether every write `meta` absorbed, and every delete that made it, lies within the cut.
    pub fn covers(&self, meta: &RowMeta) -> bool {
        meta.clock
            .dots
            .iter()
            .all(|(origin, dot)| *dot <= self.through(*origin))
            && meta
                .deleted_by
                .iter()
                .all(|(origin, seq)| *seq <= self.through(*origin))
    }
}

/// What a node can say of one of its rows under a cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Standing {
    /// Every write it absorbed is within the cut: must be the same on every node.
    Settled,
    /// A write beyond the cut, or a local write the capture has not read yet: checked again.
    InFlight,
    /// The stored row is not the version its metadata accounts for (or it has none), and the
    /// write that made it committed before the capture read past a probe: a write accord never
    /// captured (made with replication bypassed, or a restored backup). A difference by itself.
    Uncaptured,
}

/// How a node's row stands beside its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The row is stored as its metadata accounts for (or absent, and its metadata a tombstone
    /// or absent too).
    AsKnown,
    /// Stored by a write the metadata does not account for yet, committed after the probe: the
    /// capture may still read it.
    Newer,
    /// Stored by a write the metadata does not account for, committed before the probe.
    Unaccounted,
}

/// What a node's table holds of a row beside its metadata, as a round reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowVersion {
    /// In the table, stored by the write its metadata accounts for (`xmin` = `known_xmin`).
    Accounted,
    /// In the table, stored by a write its metadata does not account for; whether that write
    /// committed before the round's probe (so the capture, past the probe, read it or never will).
    Unaccounted { committed_before_probe: bool },
    /// Not in the table.
    Absent,
}

/// How a node's row stands beside its metadata. A row gone from the table while its metadata
/// says alive is a delete the capture has not read yet, or one it never will: a round's first
/// read cannot tell them apart, a recheck (`recheck`: its probe came after the first round's
/// snapshot) can.
pub fn stored(version: RowVersion, meta: Option<&RowMeta>, recheck: bool) -> Stored {
    match version {
        RowVersion::Accounted => Stored::AsKnown,
        RowVersion::Unaccounted {
            committed_before_probe: true,
        } => Stored::Unaccounted,
        RowVersion::Unaccounted {
            committed_before_probe: false,
        } => Stored::Newer,
        RowVersion::Absent if meta.is_some_and(RowMeta::is_alive) => {
            if recheck {
                Stored::Unaccounted
            } else {
                Stored::Newer
            }
        }
        RowVersion::Absent => Stored::AsKnown,
    }
}

/// Whether a row a node holds is left out of a verification: a settled tombstone is as good as
/// absent (a node may have collected it).
pub fn as_good_as_absent(present: bool, standing: Standing) -> bool {
    !present && standing == Standing::Settled
}

/// A row's standing on a node.
pub fn standing(meta: Option<&RowMeta>, stored: Stored, cut: &VerifyCut) -> Standing {
    match stored {
        Stored::Unaccounted => Standing::Uncaptured,
        Stored::Newer => Standing::InFlight,
        Stored::AsKnown => match meta {
            Some(meta) if !cut.covers(meta) => Standing::InFlight,
            _ => Standing::Settled,
        },
    }
}

/// One row as a node summarises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowSummary {
    /// Places the row in the key-hash space (`KeyHasher`).
    pub key_hash: u64,
    /// The canonical key text (`["..."]`), as accord.row_meta names the row.
    pub key: String,
    /// Hex text in JSON (which cannot hold 128-bit numbers), a number on the wire.
    #[serde(with = "digest_text")]
    pub digest: u128,
    pub standing: Standing,
    /// Whether the node has the row in its table (alive), for the report.
    pub present: bool,
}

mod digest_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(digest: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&format!("{digest:032x}"))
        } else {
            serializer.serialize_u128(*digest)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            u128::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
        } else {
            u128::deserialize(deserializer)
        }
    }
}

/// A range of the key-hash space, both ends included.
pub type HashRange = (u64, u64);

/// A node's answer for one range: how many rows fall in it, and the sum of their digests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSummary {
    pub rows: u64,
    pub sum: u128,
}

fn put(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// The digest of a row as a node holds it: its key, its values by column name (each as
/// PostgreSQL writes it as text; `None` for NULL), whether it is in the table, and its
/// metadata by column name (`names`: the columns of the shape the metadata was stored under).
/// Node-local parts of the metadata (columns of other shapes it carries) are left out, so are
/// settled tombstones (the caller leaves those rows out altogether: gone, or collected).
pub fn row_digest(
    table: &str,
    key: &str,
    values: Option<&BTreeMap<String, Option<String>>>,
    meta: Option<(&RowMeta, &[String])>,
) -> u128 {
    let mut hasher = blake3::Hasher::new();
    put(&mut hasher, table.as_bytes());
    put(&mut hasher, key.as_bytes());
    match values {
        None => put(&mut hasher, b"absent"),
        Some(values) => {
            put(&mut hasher, b"present");
            for (name, value) in values {
                put(&mut hasher, name.as_bytes());
                match value {
                    None => put(&mut hasher, b"\0null"),
                    Some(text) => put(&mut hasher, text.as_bytes()),
                }
            }
        }
    }
    match meta {
        None => put(&mut hasher, b"no metadata"),
        Some((meta, names)) => put(&mut hasher, &canonical_meta(meta, names)),
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    u128::from_le_bytes(out)
}

/// `meta` in a form equal on nodes that absorbed the same writes, whatever order they did it in
/// and whatever shape they store it under.
fn canonical_meta(meta: &RowMeta, names: &[String]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Canonical<'a> {
        causal_length: u64,
        clock: BTreeMap<NodeId, u64>,
        stamp: Option<crate::hlc::Hlc>,
        created: Option<crate::state::Version>,
        deleted_by: &'a [(NodeId, u64)],
        columns: BTreeMap<&'a str, CanonicalColumn<'a>>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        displaced: Vec<CanonicalDisplaced<'a>>,
    }
    #[derive(Serialize)]
    struct CanonicalDisplaced<'a> {
        created: crate::state::Version,
        resolved: Option<crate::state::Version>,
        columns: BTreeMap<&'a str, (CanonicalColumn<'a>, &'a Option<crate::value::Value>)>,
    }
    #[derive(Serialize)]
    enum CanonicalColumn<'a> {
        Lww(Option<crate::state::Version>),
        Delta(&'a crate::state::DeltaLedger),
        Review((Vec<crate::state::Candidate>, BTreeMap<NodeId, u64>)),
    }
    fn canonical_column(column: &ColumnMeta) -> CanonicalColumn<'_> {
        match column {
            ColumnMeta::Lww(version) => CanonicalColumn::Lww(*version),
            ColumnMeta::Delta(ledger) => CanonicalColumn::Delta(ledger),
            ColumnMeta::Review(register) => CanonicalColumn::Review(register.canonical()),
        }
    }
    let columns = names
        .iter()
        .zip(&meta.columns)
        .map(|(name, column)| (name.as_str(), canonical_column(column)))
        .collect();
    let displaced = meta
        .displaced
        .iter()
        .map(|d| CanonicalDisplaced {
            created: d.created,
            resolved: d.resolved,
            columns: d
                .columns
                .iter()
                .map(|(name, c)| (name.as_str(), (canonical_column(&c.meta), &c.value)))
                .collect(),
        })
        .collect();
    let canonical = Canonical {
        causal_length: meta.causal_length,
        clock: meta.clock.dots.iter().map(|(n, d)| (*n, *d)).collect(),
        stamp: meta.stamp,
        created: meta.created,
        deleted_by: &meta.deleted_by,
        columns,
        displaced,
    };
    // Encoding a plain struct of maps and numbers cannot fail; an empty digest input would
    // only make every row equal to every other, which the key in the digest still prevents.
    rmp_serde::to_vec(&canonical).unwrap_or_default()
}

/// The names of a table shape's columns, in its order (what `row_digest` maps metadata by).
pub fn column_names(table: &TableDef) -> Vec<String> {
    table.columns.iter().map(|c| c.name.clone()).collect()
}

/// A node's summaries of one table's rows, sorted by key hash.
#[derive(Debug, Clone, Default)]
pub struct TableSummaries {
    rows: Vec<RowSummary>,
}

impl TableSummaries {
    pub fn new(mut rows: Vec<RowSummary>) -> Self {
        rows.sort_by(|a, b| (a.key_hash, &a.key).cmp(&(b.key_hash, &b.key)));
        TableSummaries { rows }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn within(&self, (lo, hi): HashRange) -> &[RowSummary] {
        let start = self.rows.partition_point(|r| r.key_hash < lo);
        let end = self.rows.partition_point(|r| r.key_hash <= hi);
        &self.rows[start..end.max(start)]
    }

    /// The summary of a range: its rows' count and the sum of their digests.
    pub fn range(&self, range: HashRange) -> RangeSummary {
        self.within(range)
            .iter()
            .fold(RangeSummary::default(), |acc, r| RangeSummary {
                rows: acc.rows + 1,
                sum: acc.sum.wrapping_add(r.digest),
            })
    }

    /// The rows of a range.
    pub fn rows(&self, range: HashRange) -> Vec<RowSummary> {
        self.within(range).to_vec()
    }

    /// Rows not settled.
    pub fn unsettled(&self) -> impl Iterator<Item = &RowSummary> {
        self.rows.iter().filter(|r| r.standing != Standing::Settled)
    }
}

/// Splits a range into `parts` ranges covering it. The whole space splits on powers of two, so
/// that every range of the first levels is a union of whole buckets (`BucketSums`).
pub fn split((lo, hi): HashRange, parts: u64) -> Vec<HashRange> {
    let size = u128::from(hi - lo) + 1;
    let width = size / u128::from(parts.max(1));
    if width == 0 || parts <= 1 {
        return vec![(lo, hi)];
    }
    (0..u128::from(parts))
        .map(|i| {
            // Within (lo, hi): the offsets are below `size`, which is at most 2^64.
            let start = lo + (i * width) as u64;
            let end = if i + 1 == u128::from(parts) {
                hi
            } else {
                lo + ((i + 1) * width - 1) as u64
            };
            (start, end)
        })
        .collect()
}

/// How many top bits of the key hash name a bucket: a whole-table pass sums rows per bucket, and
/// ranges made of whole buckets are answered from those sums without reading the rows again.
pub const BUCKET_BITS: u32 = 16;

/// The bucket of a key hash.
pub fn bucket_of(key_hash: u64) -> u32 {
    (key_hash >> (64 - BUCKET_BITS)) as u32
}

/// Sums rows per bucket during a pass over a table: dense (a pass touches every bucket of a big
/// table), and small enough to stay in the processor's cache (each row lands in a random bucket).
#[derive(Debug, Clone)]
pub struct BucketTally {
    rows: Vec<u32>,
    sums: Vec<u64>,
}

impl Default for BucketTally {
    fn default() -> Self {
        BucketTally {
            rows: vec![0; 1 << BUCKET_BITS],
            sums: vec![0; 1 << BUCKET_BITS],
        }
    }
}

impl BucketTally {
    /// Adds a row (`rows` 1) or a part of one counted elsewhere (`rows` 0) to its key's bucket.
    /// A pass's digests are 64-bit: they only steer the descent, and a difference hides in a
    /// range's sum with a chance of 2^-64.
    pub fn add(&mut self, key_hash: u64, rows: u32, digest: u64) {
        let bucket = bucket_of(key_hash) as usize;
        // Wrapping: a bucket of more than 4 billion rows counts modulo 2^32, on every node alike.
        self.rows[bucket] = self.rows[bucket].wrapping_add(rows);
        self.sums[bucket] = self.sums[bucket].wrapping_add(digest);
    }

    /// The sums of the buckets that hold anything, kept for the round.
    pub fn finish(self) -> BucketSums {
        BucketSums {
            buckets: self
                .rows
                .into_iter()
                .zip(self.sums)
                .enumerate()
                .filter(|(_, (rows, sum))| *rows != 0 || *sum != 0)
                .map(|(i, (rows, sum))| (i as u32, u64::from(rows), sum))
                .collect(),
        }
    }
}

/// A table's rows summed per bucket, from one pass over the table (sorted by bucket, empty ones
/// left out).
#[derive(Debug, Clone, Default)]
pub struct BucketSums {
    buckets: Vec<(u32, u64, u64)>,
}

impl BucketSums {
    /// The summary of `range` when it is made of whole buckets; `None` when it cuts one. Its sum
    /// is the 64-bit wrapping sum of its rows' digests, as a node that reads the rows of the
    /// range sums them: a range reads the same whichever way a node answers it.
    pub fn range(&self, (lo, hi): HashRange) -> Option<RangeSummary> {
        let low_bits = u64::MAX >> BUCKET_BITS;
        if lo & low_bits != 0 || hi & low_bits != low_bits {
            return None;
        }
        let start = self.buckets.partition_point(|(b, _, _)| *b < bucket_of(lo));
        let end = self.buckets.partition_point(|(b, _, _)| *b <= bucket_of(hi));
        let (rows, sum) = self.buckets[start..end.max(start)]
            .iter()
            .fold((0u64, 0u64), |(rows, sum), (_, r, s)| (rows + r, sum.wrapping_add(*s)));
        Some(RangeSummary {
            rows,
            sum: u128::from(sum),
        })
    }
}

/// The hash that places a table's keys in the key-hash space: the same on every node, for the
/// canonical key text (`row_key`).
#[derive(Debug, Clone, Copy)]
pub struct KeyHasher {
    seed: u64,
}

impl KeyHasher {
    pub fn for_table(table: &str) -> KeyHasher {
        KeyHasher {
            seed: xxhash_rust::xxh3::xxh3_64(table.as_bytes()),
        }
    }

    pub fn hash(&self, key: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), self.seed)
    }
}

/// How many ranges a differing range is split into, and below how many rows its rows are asked
/// for instead.
pub const FANOUT: u64 = 16;
pub const LEAF_ROWS: u64 = 64;

/// The coordinator's comparison of one table: which ranges to ask every node for next, and,
/// from the rows of small differing ranges, the keys that differ.
#[derive(Debug, Clone)]
pub struct Descent {
    /// Ranges whose summaries are asked for next.
    pending: Vec<HashRange>,
    /// Ranges whose rows are asked for next.
    leaves: Vec<HashRange>,
}

/// What the coordinator asks every node next for a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DescentStep {
    Summaries(Vec<HashRange>),
    Rows(Vec<HashRange>),
    Done,
}

impl Default for Descent {
    fn default() -> Self {
        Descent {
            pending: split((0, u64::MAX), FANOUT),
            leaves: Vec::new(),
        }
    }
}

impl Descent {
    pub fn step(&mut self) -> DescentStep {
        if !self.pending.is_empty() {
            return DescentStep::Summaries(self.pending.clone());
        }
        if !self.leaves.is_empty() {
            return DescentStep::Rows(std::mem::take(&mut self.leaves));
        }
        DescentStep::Done
    }

    /// Every node's summaries of the ranges last asked for (one `Vec` per node, in the ranges'
    /// order): equal ranges are done, differing ones are split or their rows asked for.
    pub fn summaries(&mut self, per_node: &[Vec<RangeSummary>]) {
        let ranges = std::mem::take(&mut self.pending);
        for (i, range) in ranges.into_iter().enumerate() {
            let of: Vec<RangeSummary> = per_node.iter().map(|s| s.get(i).copied().unwrap_or_default()).collect();
            if of.windows(2).all(|w| w[0] == w[1]) {
                continue;
            }
            let most = of.iter().map(|s| s.rows).max().unwrap_or(0);
            if most <= LEAF_ROWS || range.0 == range.1 {
                self.leaves.push(range);
            } else {
                self.pending.extend(split(range, FANOUT));
            }
        }
    }
}

/// What the nodes hold of one key, when they do not all hold the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDifference {
    pub table: String,
    pub key: String,
    /// Per node: its row's summary, or `None` when it has no trace of the row.
    pub nodes: Vec<(NodeId, Option<RowSummary>)>,
}

/// What the rows of differing ranges say, key by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowVerdicts {
    /// Keys whose settled rows differ, or that a node holds uncaptured.
    pub differ: Vec<KeyDifference>,
    /// Keys in flight on some node: to check again under a later cut.
    pub in_flight: BTreeSet<String>,
}

/// Compares the nodes' rows of the same ranges, key by key.
pub fn compare_rows(table: &str, per_node: &[(NodeId, Vec<RowSummary>)]) -> RowVerdicts {
    let mut verdicts = RowVerdicts::default();
    for (key, slots) in rows_by_key(per_node, |r| &r.key) {
        let uncaptured = slots
            .iter()
            .any(|(_, r)| r.is_some_and(|r| r.standing == Standing::Uncaptured));
        let in_flight = slots
            .iter()
            .any(|(_, r)| r.is_some_and(|r| r.standing == Standing::InFlight));
        let digests: BTreeSet<Option<u128>> = slots.iter().map(|(_, r)| r.map(|r| r.digest)).collect();
        if !uncaptured && (in_flight || digests.len() == 1) {
            if in_flight {
                verdicts.in_flight.insert(key.to_owned());
            }
            continue;
        }
        verdicts.differ.push(KeyDifference {
            table: table.to_owned(),
            key: key.to_owned(),
            nodes: slots.into_iter().map(|(n, r)| (n, r.cloned())).collect(),
        });
    }
    verdicts
}

/// A whole descent over nodes' summaries held in one process (the simulator's nodes, tests), as
/// the coordinator runs it over the mesh: the verdicts, and how many rows were asked for.
pub fn compare_summaries(table: &str, nodes: &[(NodeId, TableSummaries)]) -> (RowVerdicts, usize) {
    let mut descent = Descent::default();
    let mut verdicts = RowVerdicts::default();
    let mut asked = 0;
    loop {
        match descent.step() {
            DescentStep::Summaries(ranges) => {
                let per: Vec<Vec<RangeSummary>> = nodes
                    .iter()
                    .map(|(_, s)| ranges.iter().map(|r| s.range(*r)).collect())
                    .collect();
                descent.summaries(&per);
            }
            DescentStep::Rows(ranges) => {
                let per: Vec<(NodeId, Vec<RowSummary>)> = nodes
                    .iter()
                    .map(|(n, s)| (*n, ranges.iter().flat_map(|r| s.rows(*r)).collect()))
                    .collect();
                asked += per.iter().map(|(_, r)| r.len()).sum::<usize>();
                let found = compare_rows(table, &per);
                verdicts.differ.extend(found.differ);
                verdicts.in_flight.extend(found.in_flight);
            }
            DescentStep::Done => return (verdicts, asked),
        }
    }
}

/// The nodes' rows grouped by key: per key, every node's row of it (`None`: it has none), in
/// `per_node`'s order.
pub fn rows_by_key<'a, R>(
    per_node: &'a [(NodeId, Vec<R>)],
    key: impl Fn(&R) -> &str,
) -> BTreeMap<&'a str, Vec<(NodeId, Option<&'a R>)>> {
    let mut by_key: BTreeMap<&'a str, Vec<(NodeId, Option<&'a R>)>> = BTreeMap::new();
    for (i, (_, rows)) in per_node.iter().enumerate() {
        for row in rows {
            let slots = by_key
                .entry(key(row))
                .or_insert_with(|| per_node.iter().map(|(node, _)| (*node, None)).collect());
            slots[i].1 = Some(row);
        }
    }
    by_key
}

/// The messages of a verification between the coordinating node and each node (itself
/// included, in process). A *round* is one snapshot per node and one cut; a verification runs a
/// round over whole tables, then rounds over the keys still in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifyMessage {
    /// Take a snapshot once the capture has read past a probe, and say what it has applied.
    Open {
        round: u64,
        scope: VerifyScope,
    },
    /// Per origin, the last change applied in the snapshot (this node's own: its capture's).
    Opened {
        round: u64,
        applied: Vec<(NodeId, u64)>,
    },
    /// Summarise the scope's rows under `cut`.
    Summarise {
        round: u64,
        cut: VerifyCut,
    },
    /// Per table of the scope: its rows, and the keys not settled here.
    Summarised {
        round: u64,
        tables: Vec<TableCount>,
    },
    /// The summaries of `ranges` of `table`.
    Ranges {
        round: u64,
        table: String,
        ranges: Vec<HashRange>,
    },
    RangeSummaries {
        round: u64,
        summaries: Vec<RangeSummary>,
    },
    /// The rows of `ranges` of `table`.
    Rows {
        round: u64,
        table: String,
        ranges: Vec<HashRange>,
    },
    RowList {
        round: u64,
        rows: Vec<RowSummary>,
    },
    /// The rows of `keys` of `table` whole, as the snapshot holds them (for a repair).
    Fetch {
        round: u64,
        table: String,
        keys: Vec<String>,
    },
    Fetched {
        round: u64,
        rows: Vec<HeldRow>,
    },
    /// Write these rows of `table` as the repair decided (outside the snapshot, each only if the
    /// row is still as the round read it).
    Repair {
        round: u64,
        table: String,
        writes: Vec<RepairWrite>,
    },
    Repaired {
        round: u64,
        outcomes: Vec<RepairOutcome>,
    },
    /// The round is over: let go of the snapshot.
    Close {
        round: u64,
    },
    /// The node cannot take part in the round, and why.
    Failed {
        round: u64,
        error: String,
    },
}

impl VerifyMessage {
    pub fn round(&self) -> u64 {
        match self {
            VerifyMessage::Open { round, .. }
            | VerifyMessage::Opened { round, .. }
            | VerifyMessage::Summarise { round, .. }
            | VerifyMessage::Summarised { round, .. }
            | VerifyMessage::Ranges { round, .. }
            | VerifyMessage::RangeSummaries { round, .. }
            | VerifyMessage::Rows { round, .. }
            | VerifyMessage::RowList { round, .. }
            | VerifyMessage::Fetch { round, .. }
            | VerifyMessage::Fetched { round, .. }
            | VerifyMessage::Repair { round, .. }
            | VerifyMessage::Repaired { round, .. }
            | VerifyMessage::Close { round }
            | VerifyMessage::Failed { round, .. } => *round,
        }
    }
}

/// A row as a node holds it, whole: what a repair decides from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRow {
    pub key: String,
    /// The values by column name (text; `None` for NULL); `None`: not in the table.
    pub values: Option<BTreeMap<String, Option<String>>>,
    /// The metadata, as the node's table has it now (`TableDef` column order), if any.
    pub meta: Option<RowMeta>,
    /// The columns the metadata's per-column entries are in the order of.
    pub columns: Vec<String>,
    /// The xmin of the stored row version, if the row is in the table.
    pub xmin: Option<String>,
    pub standing: Standing,
    #[serde(with = "digest_text")]
    pub digest: u128,
}

/// What a repair writes on one node for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairWrite {
    pub key: String,
    /// The row as the nodes that replicated it hold it; `None`: no such row.
    pub values: Option<BTreeMap<String, Option<String>>>,
    pub meta: Option<RowMeta>,
    pub columns: Vec<String>,
    /// The row's xmin when the round read it (`None`: not in the table): written only if still so.
    pub expect_xmin: Option<String>,
}

/// What became of a repair write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairOutcome {
    pub key: String,
    /// `None`: written; else why not.
    pub skipped: Option<String>,
}

/// The repair of one key: what each node that differs writes, or why it is left as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairPlan {
    Write(Vec<(NodeId, RepairWrite)>),
    Leave(String),
}

/// Decides the repair of one key from every node's row (`None`: the node has no trace of it).
///
/// The rows accord replicated (every row but an uncaptured one: its stored version is no write
/// accord knows) decide: they are the merge of every write replicated to the row, and a node that
/// holds something else gets them, its own version kept aside by the writer (`accord.repaired`).
/// A row no node replicated (inserted behind accord's back) is removed the same way. Replicated
/// rows still in flight leave the key for a later run; replicated rows that differ at a cut
/// (never by design: equal writes merge to equal states) are left for a person, with the reason.
pub fn repair_plan(per_node: &[(NodeId, Option<&HeldRow>)]) -> RepairPlan {
    let replicated: Vec<&(NodeId, Option<&HeldRow>)> = per_node
        .iter()
        .filter(|(_, row)| row.is_none_or(|r| r.standing != Standing::Uncaptured))
        .collect();
    if replicated.is_empty() && per_node.len() > 1 {
        return RepairPlan::Leave("no node holds the row as accord replicated it".into());
    }
    if replicated
        .iter()
        .any(|(_, row)| row.is_some_and(|r| r.standing == Standing::InFlight))
    {
        return RepairPlan::Leave("the row is being written: run the repair again".into());
    }
    let digest = |row: &Option<&HeldRow>| row.map(|r| r.digest);
    let target = &replicated[0].1;
    if replicated.iter().any(|(_, row)| digest(row) != digest(target)) {
        return RepairPlan::Leave(
            "the nodes replicated different states of the row at a cut every node applied: not repaired \
             automatically; compare them by hand"
                .into(),
        );
    }
    let writes = per_node
        .iter()
        .filter(|(_, row)| row.is_some_and(|r| r.standing == Standing::Uncaptured) || digest(row) != digest(target))
        .map(|(node, row)| {
            let write = RepairWrite {
                key: row
                    .as_ref()
                    .or(target.as_ref())
                    .map(|r| r.key.clone())
                    .unwrap_or_default(),
                values: target.and_then(|t| t.values.clone()),
                meta: target.and_then(|t| t.meta.clone()),
                columns: target.map(|t| t.columns.clone()).unwrap_or_default(),
                expect_xmin: row.and_then(|r| r.xmin.clone()),
            };
            (*node, write)
        })
        .collect();
    RepairPlan::Write(writes)
}

/// What a round compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifyScope {
    /// These tables, whole (empty: every replicated table).
    Tables(Vec<String>),
    /// These keys of these tables (keys still in flight in an earlier round).
    Keys(BTreeMap<String, Vec<String>>),
}

/// A table's rows on a node under a round's cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCount {
    pub table: String,
    pub rows: u64,
    /// Keys not settled on the node (at most [`MAX_IN_FLIGHT`]; `more_in_flight` says if more).
    pub in_flight: Vec<String>,
    pub more_in_flight: bool,
}

/// How many keys in flight a node lists per table and round.
pub const MAX_IN_FLIGHT: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn key_hash(table: &str, key: &str) -> u64 {
        KeyHasher::for_table(table).hash(key)
    }

    fn row(key: &str, digest: u128, standing: Standing) -> RowSummary {
        RowSummary {
            key_hash: key_hash("t", key),
            key: key.to_owned(),
            digest,
            standing,
            present: true,
        }
    }

    fn summaries(rows: &[RowSummary]) -> TableSummaries {
        TableSummaries::new(rows.to_vec())
    }

    fn descend(nodes: &[(NodeId, TableSummaries)]) -> (RowVerdicts, usize) {
        compare_summaries("t", nodes)
    }

    #[test]
    fn equal_nodes_exchange_no_rows() {
        let rows: Vec<RowSummary> = (0..5_000)
            .map(|i| row(&format!("[{i}]"), i as u128 * 7, Standing::Settled))
            .collect();
        let (verdicts, asked) = descend(&[(NodeId(1), summaries(&rows)), (NodeId(2), summaries(&rows))]);
        assert_eq!(verdicts, RowVerdicts::default());
        assert_eq!(asked, 0);
    }

    #[test]
    fn a_changed_a_missing_and_an_extra_row_are_found_asking_for_few_rows() {
        let rows: Vec<RowSummary> = (0..20_000)
            .map(|i| row(&format!("[{i}]"), i as u128 * 7 + 1, Standing::Settled))
            .collect();
        let mut other = rows.clone();
        other[10].digest += 1; // changed
        other.remove(500); // missing
        other.push(row("[99999]", 3, Standing::Settled)); // extra
        let (verdicts, asked) = descend(&[(NodeId(1), summaries(&rows)), (NodeId(2), summaries(&other))]);
        let keys: BTreeSet<&str> = verdicts.differ.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, BTreeSet::from(["[10]", "[500]", "[99999]"]));
        assert!(asked < 3 * 2 * LEAF_ROWS as usize, "asked for {asked} rows");
    }

    #[test]
    fn rows_in_flight_anywhere_are_set_aside_not_reported() {
        let a = vec![row("[1]", 1, Standing::Settled), row("[2]", 2, Standing::Settled)];
        let b = vec![row("[1]", 9, Standing::InFlight), row("[2]", 2, Standing::Settled)];
        let (verdicts, _) = descend(&[(NodeId(1), summaries(&a)), (NodeId(2), summaries(&b))]);
        assert!(verdicts.differ.is_empty());
        assert_eq!(verdicts.in_flight, BTreeSet::from(["[1]".to_owned()]));
    }

    #[test]
    fn an_uncaptured_row_is_a_difference_even_if_the_values_agree() {
        let a = vec![row("[1]", 1, Standing::Settled)];
        let b = vec![row("[1]", 1, Standing::Uncaptured)];
        let verdicts = compare_rows("t", &[(NodeId(1), a), (NodeId(2), b)]);
        assert_eq!(verdicts.differ.len(), 1);
    }

    #[test]
    fn the_cut_is_the_least_applied_position_per_origin() {
        let cut = VerifyCut::of(&[
            vec![(NodeId(1), 10), (NodeId(2), 5)],
            vec![(NodeId(1), 7), (NodeId(2), 9), (NodeId(3), 4)],
        ]);
        assert_eq!(cut.0, vec![(NodeId(1), 7), (NodeId(2), 5), (NodeId(3), 0)]);
    }

    fn held(key: &str, digest: u128, standing: Standing, present: bool) -> HeldRow {
        HeldRow {
            key: key.to_owned(),
            values: present.then(|| BTreeMap::from([("name".to_owned(), Some(format!("v{digest}")))])),
            meta: None,
            columns: vec!["name".into()],
            xmin: present.then(|| format!("{digest}")),
            standing,
            digest,
        }
    }

    #[test]
    fn a_repair_gives_the_replicated_row_to_the_node_that_holds_another() {
        let plan = repair_plan(&[
            (NodeId(1), Some(&held("[1]", 7, Standing::Settled, true))),
            (NodeId(2), Some(&held("[1]", 8, Standing::Uncaptured, true))),
            (NodeId(3), Some(&held("[1]", 7, Standing::Settled, true))),
        ]);
        let RepairPlan::Write(writes) = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].0, NodeId(2));
        assert_eq!(writes[0].1.values, held("[1]", 7, Standing::Settled, true).values);
        assert_eq!(writes[0].1.expect_xmin.as_deref(), Some("8"));
    }

    #[test]
    fn a_row_only_one_node_holds_uncaptured_is_removed_there() {
        let plan = repair_plan(&[
            (NodeId(1), None),
            (NodeId(2), Some(&held("[9]", 8, Standing::Uncaptured, true))),
        ]);
        let RepairPlan::Write(writes) = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(writes.len(), 1);
        assert_eq!((writes[0].0, writes[0].1.values.is_none()), (NodeId(2), true));
    }

    #[test]
    fn replicated_rows_that_differ_or_move_are_left_alone() {
        let differ = repair_plan(&[
            (NodeId(1), Some(&held("[1]", 7, Standing::Settled, true))),
            (NodeId(2), Some(&held("[1]", 9, Standing::Settled, true))),
        ]);
        assert!(matches!(differ, RepairPlan::Leave(_)), "{differ:?}");
        let moving = repair_plan(&[
            (NodeId(1), Some(&held("[1]", 7, Standing::InFlight, true))),
            (NodeId(2), Some(&held("[1]", 9, Standing::Uncaptured, true))),
        ]);
        assert!(matches!(moving, RepairPlan::Leave(_)), "{moving:?}");
    }

    #[test]
    fn messages_carry_digests_whole() {
        let message = VerifyMessage::RowList {
            round: 3,
            rows: vec![row("[1]", u128::MAX - 5, Standing::InFlight)],
        };
        let bytes = rmp_serde::to_vec_named(&message).unwrap();
        assert_eq!(rmp_serde::from_slice::<VerifyMessage>(&bytes).unwrap(), message);
    }

    #[test]
    fn a_row_gone_while_its_metadata_is_alive_is_in_flight_until_a_recheck() {
        let alive = RowMeta::pre_existing(&crate::TableDef {
            name: "t".into(),
            key: Vec::new(),
            columns: Vec::new(),
            inserts: Default::default(),
        });
        assert!(alive.is_alive());
        assert_eq!(stored(RowVersion::Absent, Some(&alive), false), Stored::Newer);
        assert_eq!(stored(RowVersion::Absent, Some(&alive), true), Stored::Unaccounted);
        assert_eq!(stored(RowVersion::Absent, None, true), Stored::AsKnown);
        assert_eq!(stored(RowVersion::Accounted, Some(&alive), true), Stored::AsKnown);
        let late = RowVersion::Unaccounted {
            committed_before_probe: false,
        };
        let early = RowVersion::Unaccounted {
            committed_before_probe: true,
        };
        assert_eq!(stored(late, Some(&alive), false), Stored::Newer);
        assert_eq!(stored(early, None, false), Stored::Unaccounted);
        assert!(as_good_as_absent(false, Standing::Settled));
        assert!(!as_good_as_absent(false, Standing::InFlight));
        assert!(!as_good_as_absent(true, Standing::Settled));
    }

    #[test]
    fn split_covers_the_range_without_gaps() {
        let parts = split((0, u64::MAX), FANOUT);
        assert_eq!(parts.first().map(|p| p.0), Some(0));
        assert_eq!(parts.last().map(|p| p.1), Some(u64::MAX));
        for w in parts.windows(2) {
            assert_eq!(w[0].1 + 1, w[1].0);
        }
        assert_eq!(split((5, 9), 16), vec![(5, 9)]);
        assert_eq!(split((0, 31), 16).last(), Some(&(30, 31)));
    }

    #[test]
    fn the_first_levels_of_the_descent_are_made_of_whole_buckets() {
        let mut tally = BucketTally::default();
        let last = u64::MAX;
        tally.add(0, 1, 4);
        tally.add(1, 1, 6);
        tally.add(1 << (64 - BUCKET_BITS), 1, 5);
        tally.add(last, 3, u64::MAX);
        let sums = tally.finish();
        let mut ranges = vec![(0, u64::MAX)];
        for _ in 0..(BUCKET_BITS / 4) {
            ranges = ranges.iter().flat_map(|r| split(*r, FANOUT)).collect();
            for r in &ranges {
                assert!(sums.range(*r).is_some(), "{r:x?} is whole buckets");
            }
        }
        assert_eq!(ranges.len(), 1 << BUCKET_BITS, "the last level is one bucket per range");
        assert_eq!(sums.range(ranges[0]), Some(RangeSummary { rows: 2, sum: 10 }));
        let whole = sums.range((0, u64::MAX)).unwrap();
        assert_eq!((whole.rows, whole.sum), (6, 14), "summed modulo 2^64");
        // Finer than a bucket: the rows must be read.
        let finer = split(ranges[0], FANOUT);
        assert_eq!(sums.range(finer[0]), None);
    }
}
