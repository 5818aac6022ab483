//! What a node reads for a verification, inside the round's snapshot.
//!
//! Two ways of reading a table. A *pass* streams the table's rows and, apart, its live metadata
//! out of PostgreSQL (`COPY ... (FORMAT binary)`: values as text, metadata as stored) and sums
//! them per bucket of the key hash as they come, with a fast hash (xxh3) of each row's values
//! and of each metadata's stored bytes and shape: nothing is decoded, joined or kept per row. A
//! *careful read* joins rows with their metadata, decodes the metadata and computes the engine's
//! canonical digest and standing; it is only done for the keys the descent narrowed down to or
//! that a recheck names.
//!
//! The fast digests only steer the descent. Equal stored bytes and values mean equal canonical
//! digests, so ranges whose sums agree are equal; the converse does not hold (metadata stored
//! under another shape, review candidates stored in another order, node-local carried columns),
//! and such ranges are read carefully, where the canonical digests decide. A node's sums are
//! compared only with other nodes' sums, never with careful digests.
//!
//! Both ways place a key by the hash of its canonical text (`store::key_text`, what `row_key`
//! holds): from the table, the key columns are read back into the key text as the capture does;
//! from the metadata, `row_key` is taken as stored. The careful read checks that both agree on
//! every row it joins.

use std::collections::{BTreeMap, BTreeSet};

use accord_engine::{
    as_good_as_absent, row_digest, standing, stored, verify::column_names, BucketSums, BucketTally, HashRange, HeldRow,
    KeyHasher, RangeSummary, RowKey, RowMeta, RowVersion, ShapeBook, TableDef, Value, VerifyCut,
};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::copy_tuples;
use super::key_locks::literal;
use super::rows::{quote_ident, quote_table, read_expr_in, value_expr_in};
use super::store::{decode, key_text, shape_of};

/// The capture's text settings (`capture::replication_config`): a value must read as the same
/// text on every node, and as decoding delivered it into `row_key`.
pub(super) const TEXT_SETTINGS: &str =
    "SET datestyle = 'ISO, YMD'; SET intervalstyle = 'iso_8601'; SET timezone = 'UTC'; SET extra_float_digits = 3";

/// PostgreSQL's snapshot of running transactions (`pg_current_snapshot()`), noted before the
/// probe: a transaction it shows committed was read by the capture once the capture passed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NotedSnapshot {
    xmin: u64,
    xmax: u64,
    running: BTreeSet<u64>,
}

impl NotedSnapshot {
    pub(super) fn parse(text: &str) -> Result<NotedSnapshot> {
        let mut parts = text.splitn(3, ':');
        let mut number = |what: &str| -> Result<u64> {
            parts
                .next()
                .with_context(|| format!("snapshot {text:?} has no {what}"))?
                .parse()
                .with_context(|| format!("snapshot {text:?}: bad {what}"))
        };
        let (xmin, xmax) = (number("xmin")?, number("xmax")?);
        let running = match parts.next() {
            Some(list) if !list.is_empty() => list
                .split(',')
                .map(|x| x.parse().with_context(|| format!("snapshot {text:?}: bad xid {x}")))
                .collect::<Result<_>>()?,
            _ => BTreeSet::new(),
        };
        Ok(NotedSnapshot { xmin, xmax, running })
    }

    /// Whether the transaction `xid` (a row's 32-bit xmin) had committed when the snapshot was
    /// taken. Its epoch is the snapshot's, or the one before for an xid above the snapshot's.
    fn committed_before(&self, xid: u32) -> bool {
        let epoch = self.xmax >> 32;
        let mut full = (epoch << 32) | u64::from(xid);
        if full > self.xmax && epoch > 0 {
            full -= 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.running.contains(&full))
    }
}

/// What a round reads rows under: the node's shapes, the round's cut, and the snapshot of running
/// transactions noted before its probe.
pub(super) struct Reading<'r> {
    pub(super) book: &'r ShapeBook,
    pub(super) cut: &'r VerifyCut,
    pub(super) before: &'r NotedSnapshot,
}

/// One replicated table as a verification reads it.
pub(super) struct TableReader<'a> {
    pub(super) table: &'a TableDef,
    /// `format_type` of each key column.
    key_types: Vec<String>,
    keys: KeyHasher,
    /// Seeds of the fast digests, from the table's name and columns (a node whose columns
    /// differ sums differently, whatever the values).
    row_seed: u64,
    meta_seed: u64,
}

impl<'a> TableReader<'a> {
    pub(super) async fn new(db: &Client, table: &'a TableDef) -> Result<TableReader<'a>> {
        let mut key_types = Vec::with_capacity(table.key.len());
        for key in &table.key {
            let row = db
                .query_one(
                    "SELECT pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute
                      WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped",
                    &[&quote_table(&table.name), &key.name],
                )
                .await
                .with_context(|| format!("the type of {}.{}", table.name, key.name))?;
            key_types.push(row.get(0));
        }
        let mut names: Vec<&str> = vec![table.name.as_str()];
        names.extend(table.key.iter().map(|k| k.name.as_str()));
        names.push("");
        names.extend(sorted_columns(table).iter().map(|c| c.name.as_str()));
        Ok(TableReader {
            table,
            key_types,
            keys: KeyHasher::for_table(&table.name),
            row_seed: seed(&names, "rows"),
            meta_seed: seed(&names, "metadata"),
        })
    }

    /// Streams the table's rows: per row its key hash, its key text and (with `values`) the fast
    /// digest of its values. The rows come as COPY's text lines, each value written by its type's
    /// output function (as the capture decodes it) in column-name order.
    async fn scan_rows(&self, db: &Client, values: bool, mut each: impl FnMut(u64, &str, u64)) -> Result<()> {
        let table = self.table;
        let mut columns: Vec<String> = table.key.iter().map(|k| value_expr_in("t", &k.name, &k.ty)).collect();
        if values {
            columns.extend(sorted_columns(table).iter().map(|c| value_expr_in("t", &c.name, &c.ty)));
        }
        let sql = format!(
            "COPY (SELECT {} FROM {} AS t) TO STDOUT",
            columns.join(", "),
            quote_table(&table.name)
        );
        let stream = db
            .copy_out(sql.as_str())
            .await
            .with_context(|| format!("cannot read the rows of {}", table.name))?;
        let mut parts = Vec::with_capacity(table.key.len());
        let integer_key = matches!(table.key.as_slice(), [only] if only.ty.is_integer());
        let mut written = String::new();
        copy_tuples::for_each_line(stream, |line| {
            let mut fields = line.split(|&b| b == b'\t');
            let first = fields.next().unwrap_or_default();
            let key: &str = match first {
                // A bigint key as `key_text` writes it, without parsing it first (most tables).
                _ if integer_key && is_canonical_integer(first) => {
                    written.clear();
                    written.push('[');
                    written.push_str(std::str::from_utf8(first).context("an integer key that is not ASCII")?);
                    written.push(']');
                    &written
                }
                _ => {
                    parts.clear();
                    let mut field = Some(first);
                    for column in &table.key {
                        let text = field
                            .map(copy_tuples::text_field)
                            .transpose()?
                            .flatten()
                            .with_context(|| format!("{}.{} is NULL", table.name, column.name))?;
                        parts.push(
                            Value::parse(&column.ty, &text)
                                .map_err(|e| anyhow!("{}.{}: {e}", table.name, column.name))?,
                        );
                        field = fields.next();
                    }
                    written = key_text(&RowKey(std::mem::take(&mut parts)));
                    &written
                }
            };
            // The line as COPY wrote it: the values tab-separated, escaped, NULL as \N.
            let digest = if values {
                xxh3_64_with_seed(line, self.row_seed)
            } else {
                0
            };
            each(self.keys.hash(key), key, digest);
            Ok(())
        })
        .await
    }

    /// Streams the table's metadata (`live`: only rows' that are alive): per row its key hash,
    /// its `row_key` and the fast digest of its stored bytes and shape. Tombstones are left out
    /// of sums: a node may have collected one another still holds, and the row they stand for is
    /// absent on both.
    async fn scan_meta(&self, db: &Client, live: bool, mut each: impl FnMut(u64, &str, u64)) -> Result<()> {
        let sql = format!(
            "COPY (SELECT m.row_key, m.meta, m.shape FROM accord.row_meta AS m WHERE m.table_name = {}{})
               TO STDOUT (FORMAT binary)",
            literal(&self.table.name),
            if live { " AND m.alive" } else { "" }
        );
        let stream = db
            .copy_out(sql.as_str())
            .await
            .with_context(|| format!("cannot read the metadata of {}", self.table.name))?;
        copy_tuples::for_each(stream, |tuple| {
            let key = tuple.text(0)?.context("metadata without a row_key")?;
            // The tuple's encoding: the key, the stored bytes and the shape, each with its length.
            each(
                self.keys.hash(key),
                key,
                xxh3_64_with_seed(tuple.encoding(), self.meta_seed),
            );
            Ok(())
        })
        .await
    }

    /// A pass: the table's rows and its live metadata summed per bucket; and the table's rows.
    pub(super) async fn sum_buckets(&self, db: &Client) -> Result<(BucketSums, u64)> {
        let mut tally = BucketTally::default();
        let mut rows = 0u64;
        // A bucket counts the table's rows (what the descent sizes its leaves by); metadata
        // only adds to the sums.
        self.scan_rows(db, true, |hash, _, digest| {
            rows += 1;
            tally.add(hash, 1, digest);
        })
        .await?;
        self.scan_meta(db, true, |hash, _, digest| tally.add(hash, 0, digest))
            .await?;
        Ok((tally.finish(), rows))
    }

    /// The summaries of ranges finer than a bucket: a pass again, keeping only theirs.
    pub(super) async fn sum_ranges(&self, db: &Client, ranges: &[HashRange]) -> Result<Vec<RangeSummary>> {
        // Summed as a pass sums a bucket (`BucketTally`: 64-bit sums), so that a range reads
        // the same whichever way a node sums it.
        let mut out = vec![(0u64, 0u64); ranges.len()];
        let holding = range_finder(ranges);
        self.scan_rows(db, true, |hash, _, digest| {
            if let Some(i) = holding(hash) {
                out[i].0 += 1;
                out[i].1 = out[i].1.wrapping_add(digest);
            }
        })
        .await?;
        self.scan_meta(db, true, |hash, _, digest| {
            if let Some(i) = holding(hash) {
                out[i].1 = out[i].1.wrapping_add(digest);
            }
        })
        .await?;
        Ok(out
            .into_iter()
            .map(|(rows, sum)| RangeSummary {
                rows,
                sum: u128::from(sum),
            })
            .collect())
    }

    /// A careful read of the rows of `ranges` (the descent's leaves): their keys found by a pass
    /// over the keys alone (the tombstones' too), then read by key.
    pub(super) async fn read_ranges(
        &self,
        db: &Client,
        under: &Reading<'_>,
        ranges: &[HashRange],
        each: impl FnMut(u64, HeldRow),
    ) -> Result<()> {
        let holding = range_finder(ranges);
        let mut keys: BTreeSet<String> = BTreeSet::new();
        self.scan_rows(db, false, |hash, key, _| {
            if holding(hash).is_some() {
                keys.insert(key.to_owned());
            }
        })
        .await?;
        self.scan_meta(db, false, |hash, key, _| {
            if holding(hash).is_some() {
                keys.insert(key.to_owned());
            }
        })
        .await?;
        let keys: Vec<String> = keys.into_iter().collect();
        self.read_rows(db, under, &keys, false, each).await
    }

    /// The key columns' values parsed back from the key text `text` (`row_key`'s form).
    fn parsed_key(&self, text: &str) -> Vec<String> {
        self.key_types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("({text}::jsonb->>{i})::{ty}"))
            .collect()
    }

    /// A careful read of the rows of `keys` (canonical key text, as `row_key`), with their
    /// metadata, under the round's cut: per row its key hash and what the node holds. Settled tombstones
    /// are left out (as good as absent: a node may have collected them). `recheck`: the keys are
    /// read again in a later round (a row gone while its metadata is alive was not being deleted
    /// when the round's probe was written).
    pub(super) async fn read_rows(
        &self,
        db: &Client,
        under: &Reading<'_>,
        keys: &[String],
        recheck: bool,
        mut each: impl FnMut(u64, HeldRow),
    ) -> Result<()> {
        let table = self.table;
        let keys_of = table.key.len();
        let mut inner_row = vec!["t.xmin::text AS x".to_owned()];
        inner_row.extend(
            table
                .key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("t.{} AS k{i}", quote_ident(&k.name))),
        );
        inner_row.extend(
            table
                .key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{} AS kt{i}", read_expr_in("t", &k.name, &k.ty))),
        );
        inner_row.extend(
            table
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{} AS c{i}", read_expr_in("t", &c.name, &c.ty))),
        );
        let parsed_keys: Vec<String> = self
            .parsed_key("m.row_key")
            .iter()
            .enumerate()
            .map(|(i, part)| format!("{part} AS k{i}"))
            .collect();
        let wanted = self.parsed_key("k");
        let key_columns: Vec<String> = table
            .key
            .iter()
            .map(|k| format!("t.{}", quote_ident(&k.name)))
            .collect();
        let join: Vec<String> = (0..keys_of).map(|i| format!("t.k{i} = m.k{i}")).collect();
        let mut select = vec!["t.x".to_owned()];
        select.extend((0..keys_of).map(|i| format!("t.kt{i}")));
        select.extend((0..table.columns.len()).map(|i| format!("t.c{i}")));
        select.extend(["m.row_key", "m.meta", "m.known_xmin", "m.shape"].map(str::to_owned));
        let sql = format!(
            "SELECT {} FROM (SELECT {} FROM {} AS t
                              WHERE ({}) IN (SELECT {} FROM unnest($2::text[]) AS k)) AS t
               FULL JOIN (SELECT m.row_key, m.meta, m.known_xmin, m.shape, {} FROM accord.row_meta AS m
                           WHERE m.table_name = $1 AND m.row_key = ANY($2::text[])) AS m
               ON {}",
            select.join(", "),
            inner_row.join(", "),
            quote_table(&table.name),
            key_columns.join(", "),
            wanted.join(", "),
            parsed_keys.join(", "),
            join.join(" AND "),
        );
        let keys: Vec<String> = keys.to_vec();
        let params: Vec<&(dyn ToSql + Sync)> = vec![&table.name, &keys];
        let rows = db
            .query_raw(&sql, params)
            .await
            .with_context(|| format!("cannot read {} and its metadata", table.name))?;
        pin_mut!(rows);
        let names = column_names(table);
        let current = table.shape_id();
        while let Some(row) = rows.try_next().await? {
            let xmin: Option<String> = row.try_get(0)?;
            let at = 1 + keys_of + table.columns.len();
            let stored_key: Option<String> = row.try_get(at)?;
            let meta: Option<RowMeta> = match row.try_get::<_, Option<&[u8]>>(at + 1)? {
                Some(bytes) => {
                    let meta: RowMeta = decode("row metadata", bytes)?;
                    let shape = row.try_get::<_, Option<i64>>(at + 3)?.map(shape_of);
                    if shape == Some(current) {
                        // Hashing the table's definition for every row was a tenth of the read.
                        Some(meta)
                    } else {
                        Some(under.book.stored_meta(meta, shape, table)?)
                    }
                }
                None => None,
            };
            let known: Option<String> = row.try_get(at + 2)?;
            let key = match (&xmin, &stored_key) {
                (Some(_), _) => {
                    let mut parts = Vec::with_capacity(keys_of);
                    for (i, column) in table.key.iter().enumerate() {
                        let text: Option<String> = row.try_get(1 + i)?;
                        let text = text.with_context(|| format!("{}.{} is NULL", table.name, column.name))?;
                        parts.push(
                            Value::parse(&column.ty, &text)
                                .map_err(|e| anyhow!("{}.{}: {e}", table.name, column.name))?,
                        );
                    }
                    let key = key_text(&RowKey(parts));
                    if let Some(stored) = stored_key.as_ref().filter(|stored| **stored != key) {
                        bail!(
                            "{}: a row's key reads as {key} from the table and as {stored} in its metadata; \
                             verification cannot place it",
                            table.name
                        );
                    }
                    key
                }
                (None, Some(stored)) => stored.clone(),
                (None, None) => continue,
            };
            let values: Option<BTreeMap<String, Option<String>>> = match &xmin {
                Some(_) => {
                    let mut values = BTreeMap::new();
                    for (i, column) in table.columns.iter().enumerate() {
                        values.insert(column.name.clone(), row.try_get::<_, Option<String>>(1 + keys_of + i)?);
                    }
                    Some(values)
                }
                None => None,
            };
            let version = match (&xmin, &known) {
                (Some(xmin), Some(known)) if known == xmin => RowVersion::Accounted,
                (Some(xmin), _) => {
                    let xid: u32 = xmin.parse().with_context(|| format!("xmin {xmin}"))?;
                    RowVersion::Unaccounted {
                        committed_before_probe: under.before.committed_before(xid),
                    }
                }
                (None, _) => RowVersion::Absent,
            };
            let standing = standing(meta.as_ref(), stored(version, meta.as_ref(), recheck), under.cut);
            if as_good_as_absent(values.is_some(), standing) {
                continue;
            }
            let digest = row_digest(
                &table.name,
                &key,
                values.as_ref(),
                meta.as_ref().map(|m| (m, names.as_slice())),
            );
            each(
                self.keys.hash(&key),
                HeldRow {
                    key,
                    values,
                    meta,
                    // Named by the caller that keeps the row (`Fetch`): most rows are only summarised.
                    columns: Vec::new(),
                    xmin,
                    standing,
                    digest,
                },
            );
        }
        Ok(())
    }
}

/// The index of the range of `ranges` holding a hash, if one does (the descent's ranges do not
/// overlap: the one holding a hash is the last starting at or below it).
fn range_finder(ranges: &[HashRange]) -> impl Fn(u64) -> Option<usize> + '_ {
    let mut by_start: Vec<usize> = (0..ranges.len()).collect();
    by_start.sort_by_key(|&i| ranges[i].0);
    move |hash| {
        let before = by_start.partition_point(|&i| ranges[i].0 <= hash);
        before
            .checked_sub(1)
            .map(|p| by_start[p])
            .filter(|&i| hash <= ranges[i].1)
    }
}

/// Whether `text` is an integer as PostgreSQL and `key_text` write one (no sign but a minus, no
/// leading zeros), within a bigint's digits.
fn is_canonical_integer(text: &[u8]) -> bool {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    !digits.is_empty()
        && digits.len() <= 19
        && digits.iter().all(u8::is_ascii_digit)
        && (digits[0] != b'0' || (digits.len() == 1 && digits.len() == text.len()))
}

/// The table's non-key columns by name: the order a fast digest reads values in, whatever the
/// column order of the node's table.
fn sorted_columns(table: &TableDef) -> Vec<&accord_engine::ColumnDef> {
    let mut columns: Vec<&accord_engine::ColumnDef> = table.columns.iter().collect();
    columns.sort_by(|a, b| a.name.cmp(&b.name));
    columns
}

fn seed(names: &[&str], what: &str) -> u64 {
    let mut bytes = what.as_bytes().to_vec();
    for name in names {
        bytes.extend_from_slice(&(name.len() as u64).to_le_bytes());
        bytes.extend_from_slice(name.as_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

#[cfg(test)]
mod tests {
    use accord_engine::{split, ColumnDef, ColumnPolicy, ColumnType, KeyColumn, TableDef, FANOUT};

    use super::{NotedSnapshot, TableReader};

    /// A range reads the same from a pass's bucket sums as from a pass over its rows (what a node
    /// does for ranges finer than a bucket): a node may answer either way.
    #[tokio::test]
    async fn a_range_sums_alike_from_buckets_and_from_its_rows() {
        let pg = crate::scratch_pg::PgCluster::start()
            .unwrap_or_else(|e| panic!("this test needs PostgreSQL 15 (apt install postgresql-15): {e:#}"));
        let db = pg.create_database("verify").await.unwrap();
        db.batch_execute(
            "CREATE SCHEMA shop;
             CREATE TABLE shop.items (id bigint PRIMARY KEY, name text, price numeric(10,2));
             INSERT INTO shop.items SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE 'item ' || g END, g / 3.0
               FROM generate_series(1, 3000) g;
             CREATE SCHEMA accord;
             CREATE TABLE accord.row_meta (table_name text NOT NULL, row_key text NOT NULL, meta bytea NOT NULL,
               alive boolean NOT NULL, known_xmin text, shape bigint, PRIMARY KEY (table_name, row_key));
             INSERT INTO accord.row_meta SELECT 'shop.items', '[' || g || ']', decode(md5(g::text), 'hex'), g % 5 <> 0, NULL, g
               FROM generate_series(1, 3200) g;",
        )
        .await
        .unwrap();
        let column = |name: &str, ty| ColumnDef {
            name: name.into(),
            ty,
            policy: ColumnPolicy::Lww,
        };
        let table = TableDef {
            name: "shop.items".into(),
            key: vec![KeyColumn {
                name: "id".into(),
                ty: ColumnType::BigInt,
            }],
            columns: vec![
                column("name", ColumnType::Other("text".into())),
                column(
                    "price",
                    ColumnType::Numeric {
                        precision: Some(10),
                        scale: Some(2),
                    },
                ),
            ],
            inserts: Default::default(),
        };
        let reader = TableReader::new(&db, &table).await.unwrap();
        let (sums, rows) = reader.sum_buckets(&db).await.unwrap();
        assert_eq!(rows, 3000);
        let top = split((0, u64::MAX), FANOUT);
        let from_rows = reader.sum_ranges(&db, &top).await.unwrap();
        let from_buckets: Vec<_> = top.iter().map(|r| sums.range(*r).unwrap()).collect();
        assert_eq!(from_rows, from_buckets);
        assert_eq!(from_rows.iter().map(|s| s.rows).sum::<u64>(), 3000);
        // Finer than a bucket: the parts add up to it, modulo 2^64 as a bucket sums.
        let hash = accord_engine::KeyHasher::for_table("shop.items").hash("[1]");
        let low_bits = u64::MAX >> accord_engine::verify::BUCKET_BITS;
        let bucket = (hash & !low_bits, hash | low_bits);
        let parts = split(bucket, FANOUT);
        let fine = reader.sum_ranges(&db, &parts).await.unwrap();
        let whole = sums.range(bucket).unwrap();
        assert_eq!(fine.iter().map(|s| s.rows).sum::<u64>(), whole.rows);
        let sum = fine.iter().fold(0u64, |acc, s| acc.wrapping_add(s.sum as u64));
        assert_eq!(u128::from(sum), whole.sum);
        assert!(whole.rows > 0, "the bucket of row 1 holds it");
        assert_eq!(sums.range(split(bucket, FANOUT)[0]), None, "finer than a bucket");
    }

    #[test]
    fn an_integer_key_is_written_as_key_text_writes_it() {
        for n in [0i64, 7, -7, 1_000_000, i64::MAX, i64::MIN + 1] {
            let text = n.to_string();
            assert!(super::is_canonical_integer(text.as_bytes()), "{text}");
            let written = format!("[{text}]");
            assert_eq!(
                written,
                super::key_text(&accord_engine::RowKey(vec![accord_engine::Value::Int(n)]))
            );
        }
        for other in ["", "-", "-0", "007", "+1", "1.0", "1e3", "12345678901234567890"] {
            assert!(!super::is_canonical_integer(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn a_noted_snapshot_tells_committed_transactions_from_later_and_running_ones() {
        let snapshot = NotedSnapshot::parse("100:110:103,105").unwrap();
        assert!(snapshot.committed_before(99));
        assert!(snapshot.committed_before(104));
        assert!(!snapshot.committed_before(103), "running");
        assert!(!snapshot.committed_before(110), "not yet begun");
        assert!(NotedSnapshot::parse("7:7:").unwrap().committed_before(6));
        // An xid of the epoch before: its 32 bits above the snapshot's.
        let wrapped = NotedSnapshot::parse(&format!("{}:{}:", (1u64 << 32) + 5, (1u64 << 32) + 9)).unwrap();
        assert!(wrapped.committed_before(u32::MAX));
        assert!(wrapped.committed_before(4));
        assert!(!wrapped.committed_before(9));
    }
}
