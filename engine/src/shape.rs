//! Reading a change written under another shape of its table (issue 17: schema changes while the
//! cluster runs).
//!
//! Users migrate each node when they like, so for a while the nodes hold different shapes of a
//! table: one has a column the other has not added yet, or has dropped already. A change names
//! the shape it was written under ([`ShapeId`]); the receiver knows that shape (peers send theirs
//! before any change written under it) and reads the change by column *name*, never by position:
//! - a column both have: the value and its metadata, if the receiver's type holds every value of
//!   the sender's (`integer` → `bigint`, `numeric(10,2)` → `numeric(12,2)`); else the change
//!   waits until the receiver's column is widened too;
//! - a column only the receiver has: the change says nothing of it. Its metadata is the policy's
//!   bottom (no write), so a merge into an existing row keeps the receiver's value, and a row new
//!   to the receiver takes the column's default, as an insert there without the column would;
//! - a column only the sender has: ignored if the receiver had it and dropped it (a drop is safe
//!   while peers still send the column); otherwise the receiver has not added it yet, and the
//!   change waits until it has.
//!
//! The same rules, without the waiting, read the receiver's own stored metadata written under an
//! earlier shape of its table ([`reshape_meta`]): a node's own shapes follow one another.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::change::RowChange;
use crate::schema::{ColumnPolicy, ColumnType, InsertPolicy, TableDef};
use crate::state::{Cell, ColumnMeta, RowMeta};
use crate::value::Value;

/// A shape of a table: its name, key and columns (names, types, policies), hashed. Two nodes
/// with the same shape of a table read each other's changes as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShapeId(pub u64);

impl std::fmt::Display for ShapeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl TableDef {
    /// This shape's id: a hash of every name, type and policy, each length-prefixed so that no two
    /// shapes encode alike.
    pub fn shape_id(&self) -> ShapeId {
        // Encoded whole and hashed once, formatting through one scratch string: every captured
        // and applied change asks for it, and a string per name and type cost ~0.5 µs a call.
        // The bytes are the ones ids were always made of (`shape_ids_are_pinned`).
        let mut bytes: Vec<u8> = Vec::with_capacity(256);
        let mut scratch = String::new();
        let put = |bytes: &mut Vec<u8>, text: &str| {
            bytes.extend_from_slice(&(text.len() as u64).to_le_bytes());
            bytes.extend_from_slice(text.as_bytes());
        };
        let mut put_shown = |bytes: &mut Vec<u8>, shown: &dyn std::fmt::Display| {
            use std::fmt::Write;
            scratch.clear();
            // Writing into a String cannot fail.
            let _ = write!(scratch, "{shown}");
            put(bytes, &scratch);
        };
        put(&mut bytes, &self.name);
        put_shown(&mut bytes, &self.key.len());
        for key in &self.key {
            put(&mut bytes, &key.name);
            put_shown(&mut bytes, &key.ty);
        }
        put_shown(&mut bytes, &self.columns.len());
        for column in &self.columns {
            put(&mut bytes, &column.name);
            put_shown(&mut bytes, &column.ty);
            put(&mut bytes, column.policy.keyword());
        }
        // Only when not the default, so that shapes recorded before the option keep their ids.
        if self.inserts != InsertPolicy::Merge {
            put(&mut bytes, "inserts");
            put(&mut bytes, self.inserts.keyword());
        }
        let hash = blake3::hash(&bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        ShapeId(u64::from_le_bytes(first))
    }
}

/// A table as the receiving node has it now.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalTable {
    pub def: TableDef,
    /// Per column of `def`, what a row new here takes when a change does not carry the column:
    /// its default (`None`: no default, so NULL).
    pub defaults: Vec<Option<Value>>,
    /// Columns an earlier shape of the table had here, and this one has not: dropped.
    pub dropped: BTreeSet<String>,
}

impl LocalTable {
    /// A table whose columns have no defaults and never lost a column.
    pub fn plain(def: TableDef) -> Self {
        let defaults = vec![None; def.columns.len()];
        LocalTable {
            def,
            defaults,
            dropped: BTreeSet::new(),
        }
    }
}

/// The shapes a node knows, by id: its own (each it wrote or read under) and every peer's it has
/// been told of; and what its own tables fill a column with that a change does not carry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShapeBook {
    shapes: BTreeMap<ShapeId, TableDef>,
    /// Per table, its columns' defaults and the columns it dropped (`LocalTable`).
    local: BTreeMap<String, (Vec<Option<Value>>, BTreeSet<String>)>,
    /// Per table, the shape of metadata stored before stored metadata named its shape.
    unnamed: BTreeMap<String, ShapeId>,
}

/// A node's replicated tables as it has them now, and the shapes it knows: what an apply reads
/// changes against.
#[derive(Debug, Clone)]
pub struct NodeSchema {
    pub tables: std::sync::Arc<[TableDef]>,
    pub shapes: std::sync::Arc<ShapeBook>,
    /// Tables this node replicated and left (untagged): peers' changes to them are not applied
    /// here, where a table not replicated yet makes them wait.
    pub left: std::sync::Arc<BTreeSet<String>>,
}

impl NodeSchema {
    /// Tables whose shapes are all the node knows (its own, and peers with the same).
    pub fn of(tables: std::sync::Arc<[TableDef]>) -> Self {
        let mut shapes = ShapeBook::default();
        for table in tables.iter() {
            shapes.learn(table.clone());
        }
        NodeSchema {
            tables,
            shapes: std::sync::Arc::new(shapes),
            left: std::sync::Arc::default(),
        }
    }
}

/// What a receiver makes of a change.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// Written under the receiver's own shape (or before changes named theirs): as it is.
    AsItIs,
    /// Read by name into the receiver's shape.
    Reshaped(Box<RowChange>),
    /// Not readable here yet: why, in words for `accord status` and the log.
    Waits(String),
}

impl ShapeBook {
    pub fn learn(&mut self, def: TableDef) {
        self.shapes.insert(def.shape_id(), def);
    }

    pub fn get(&self, id: ShapeId) -> Option<&TableDef> {
        self.shapes.get(&id)
    }

    pub fn shapes(&self) -> impl Iterator<Item = &TableDef> {
        self.shapes.values()
    }

    /// Sets what `table` fills a column with that a change does not carry, and the columns it
    /// dropped.
    pub fn set_local(&mut self, table: &str, defaults: Vec<Option<Value>>, dropped: BTreeSet<String>) {
        self.local.insert(table.to_owned(), (defaults, dropped));
    }

    /// Metadata of `table` stored without a shape was stored under `shape` (the node's first
    /// recorded shape of it).
    pub fn set_unnamed(&mut self, table: &str, shape: ShapeId) {
        self.unnamed.insert(table.to_owned(), shape);
    }

    /// Row metadata this node stored under `stored` (`None`: before it named shapes), as its
    /// table `table` has it now ([`reshape_meta`]).
    pub fn stored_meta(&self, meta: RowMeta, stored: Option<ShapeId>, table: &TableDef) -> Result<RowMeta, ShapeError> {
        self.stored_meta_under(meta, stored, table, table.shape_id())
    }

    /// [`ShapeBook::stored_meta`], with `table`'s shape id (`current`) already known.
    pub fn stored_meta_under(
        &self,
        meta: RowMeta,
        stored: Option<ShapeId>,
        table: &TableDef,
        current: ShapeId,
    ) -> Result<RowMeta, ShapeError> {
        let stored = stored
            .or_else(|| self.unnamed.get(&table.name).copied())
            .unwrap_or(current);
        if stored == current {
            return Ok(meta);
        }
        let from = self.get(stored).ok_or_else(|| ShapeError::UnknownShape {
            table: table.name.clone(),
            shape: stored,
        })?;
        let dropped = self
            .local
            .get(&table.name)
            .map(|(_, dropped)| dropped.clone())
            .unwrap_or_default();
        Ok(reshape_meta(&meta, from, table, &dropped))
    }

    /// `table` as this node has it, for [`reshape_change`].
    pub fn local_table(&self, table: &TableDef) -> LocalTable {
        match self.local.get(&table.name) {
            Some((defaults, dropped)) if defaults.len() == table.columns.len() => LocalTable {
                def: table.clone(),
                defaults: defaults.clone(),
                dropped: dropped.clone(),
            },
            Some((_, dropped)) => LocalTable {
                dropped: dropped.clone(),
                ..LocalTable::plain(table.clone())
            },
            None => LocalTable::plain(table.clone()),
        }
    }

    /// Reads `change` for this node, whose table is `local` (`None`: not replicated here).
    pub fn read(&self, change: &RowChange, local: Option<&TableDef>) -> Reading {
        self.read_under(change, local.map(|t| (t, t.shape_id())))
    }

    /// [`ShapeBook::read`], with the local table's shape id already known (a batch reads many
    /// changes of one table).
    pub fn read_under(&self, change: &RowChange, local: Option<(&TableDef, ShapeId)>) -> Reading {
        let Some(id) = change.shape else {
            return Reading::AsItIs;
        };
        let Some((local, local_id)) = local else {
            return Reading::Waits(format!(
                "table {} is replicated on the sending node and not here: tag it `@accord replicate` here too",
                change.table
            ));
        };
        if local_id == id {
            return Reading::AsItIs;
        }
        let Some(theirs) = self.get(id) else {
            return Reading::Waits(format!(
                "a change to {} names shape {id}, which the sending node has not described",
                change.table
            ));
        };
        match reshape_change(change, theirs, &self.local_table(local)) {
            Ok(Reshaped::Ready(read)) => Reading::Reshaped(read),
            Ok(Reshaped::Waits { columns }) => Reading::Waits(format!(
                "changes to {} carry column(s) {} that this node's table lacks or holds narrower: migrate it here \
                 too, and they are applied",
                change.table,
                columns.join(", ")
            )),
            Err(error) => Reading::Waits(error.to_string()),
        }
    }
}

/// A change as the receiver's shape reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reshaped {
    Ready(Box<RowChange>),
    /// The change carries what the receiver's table cannot hold yet: these columns (missing, or
    /// narrower than the sender's). It waits until the receiver's schema catches up.
    Waits {
        columns: Vec<String>,
    },
}

/// Shapes no migration can bridge: refused, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ShapeError {
    #[error(
        "the key of {table} differs between the nodes ({theirs} there, {ours} here): accord cannot follow a \
         change of a replicated table's primary key"
    )]
    KeyDiffers {
        table: String,
        ours: String,
        theirs: String,
    },
    #[error(
        "column {table}.{column} is `{theirs}` on the sending node and `{ours}` here: changing a column's policy \
         is not supported while nodes disagree; give every node the same tag"
    )]
    PolicyDiffers {
        table: String,
        column: String,
        ours: ColumnPolicy,
        theirs: ColumnPolicy,
    },
    #[error(
        "{table} treats two inserts of one key as `inserts={}` here and as `inserts={}` on the sender: \
         annotate it alike on every node",
        ours.keyword(),
        theirs.keyword()
    )]
    InsertsDiffer {
        table: String,
        ours: InsertPolicy,
        theirs: InsertPolicy,
    },
    #[error("metadata of {table} was stored under shape {shape}, which accord.shapes does not hold")]
    UnknownShape { table: String, shape: ShapeId },
    #[error("the change is for {change_table}, the shape for {table}")]
    WrongTable { table: String, change_table: String },
}

/// Whether a column of type `to` holds every value of a column of type `from`, each written as
/// text and read back (so `real` → `double precision` holds).
pub fn holds(to: &ColumnType, from: &ColumnType) -> bool {
    use ColumnType::*;
    // Integer digits a type holds, for the integer and numeric families.
    fn digits(ty: &ColumnType) -> Option<(Option<u32>, u32)> {
        match ty {
            SmallInt => Some((Some(5), 0)),
            Integer => Some((Some(10), 0)),
            BigInt => Some((Some(19), 0)),
            Numeric {
                precision: Some(p),
                scale,
            } => {
                let s = scale.unwrap_or(0);
                Some((Some(p.saturating_sub(s)), s))
            }
            // Unconstrained: any number of digits on either side.
            Numeric { precision: None, .. } => Some((None, u32::MAX)),
            _ => None,
        }
    }
    if to == from {
        return true;
    }
    match (to, from) {
        (DoublePrecision, Real) => true,
        (Other(to), Other(from)) => other_holds(to, from),
        _ => match (digits(to), digits(from)) {
            (Some((to_int, to_scale)), Some((from_int, from_scale))) => {
                let int_ok = match (to_int, from_int) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(t), Some(f)) => t >= f,
                };
                // An integer column's values in a numeric one: whole numbers, any scale holds them.
                int_ok && (from.is_integer() || to_scale >= from_scale)
            }
            _ => false,
        },
    }
}

/// `character varying(n)` into a longer one or `text`.
fn other_holds(to: &str, from: &str) -> bool {
    let length = |ty: &str| -> Option<u32> {
        ty.strip_prefix("character varying(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|n| n.parse().ok())
    };
    match (to, length(from)) {
        ("text" | "character varying", Some(_)) => true,
        (to, Some(n)) => length(to).is_some_and(|m| m >= n),
        _ => false,
    }
}

/// Reads `change`, written under the sender's shape `from`, as `to` has the table.
pub fn reshape_change(change: &RowChange, from: &TableDef, to: &LocalTable) -> Result<Reshaped, ShapeError> {
    let table = &to.def;
    if change.table != table.name || from.name != table.name {
        return Err(ShapeError::WrongTable {
            table: table.name.clone(),
            change_table: change.table.clone(),
        });
    }
    let key_names = |t: &TableDef| t.key.iter().map(|k| k.name.clone()).collect::<Vec<_>>().join(", ");
    if key_names(from) != key_names(table) {
        return Err(ShapeError::KeyDiffers {
            table: table.name.clone(),
            ours: key_names(table),
            theirs: key_names(from),
        });
    }
    if from.inserts != table.inserts {
        return Err(ShapeError::InsertsDiffer {
            table: table.name.clone(),
            ours: table.inserts,
            theirs: from.inserts,
        });
    }
    let mut waits: Vec<String> = table
        .key
        .iter()
        .zip(&from.key)
        .filter(|(ours, theirs)| !holds(&ours.ty, &theirs.ty))
        .map(|(ours, _)| ours.name.clone())
        .collect();
    for (theirs, _) in from.columns.iter().zip(0..) {
        match table.column_index(&theirs.name) {
            Some(i) => {
                let ours = &table.columns[i];
                if ours.policy != theirs.policy {
                    return Err(ShapeError::PolicyDiffers {
                        table: table.name.clone(),
                        column: ours.name.clone(),
                        ours: ours.policy,
                        theirs: theirs.policy,
                    });
                }
                if !holds(&ours.ty, &theirs.ty) {
                    waits.push(ours.name.clone());
                }
            }
            None if to.dropped.contains(&theirs.name) => {}
            None => waits.push(theirs.name.clone()),
        }
    }
    if !waits.is_empty() {
        return Ok(Reshaped::Waits { columns: waits });
    }
    let mut out = change.clone();
    if change.row.is_alive() {
        let row = &change.row;
        let mut values = Vec::with_capacity(table.columns.len());
        let mut metas = Vec::with_capacity(table.columns.len());
        for (i, ours) in table.columns.iter().enumerate() {
            match from.column_index(&ours.name) {
                Some(j) => {
                    values.push(row.values.get(j).cloned().unwrap_or(Cell::UnchangedToast));
                    metas.push(
                        row.meta
                            .columns
                            .get(j)
                            .cloned()
                            .unwrap_or_else(|| ColumnMeta::fresh(ours.policy)),
                    );
                }
                None => {
                    values.push(Cell::Value(
                        to.defaults.get(i).cloned().flatten().unwrap_or(Value::Null),
                    ));
                    metas.push(ColumnMeta::fresh(ours.policy));
                }
            }
        }
        out.row.values = values;
        out.row.meta.columns = metas;
    }
    // Kept for later (`accord.deferred`), it is read as this shape, whatever the table becomes.
    out.shape = Some(table.shape_id());
    Ok(Reshaped::Ready(Box::new(out)))
}

/// Reads row metadata the node stored under another shape of its table, `from`, as the shape
/// `to` has it: a column `to` adds had no write (or was kept in `carried` by a reader behind it);
/// a column `to` lacks is kept in `carried` unless this node dropped it (`dropped`), so a reader
/// behind the table's latest shape never loses what a reader ahead of it wrote. A column whose
/// policy changed starts over at the new policy's bottom (its history under the old policy
/// means nothing to the new one).
pub fn reshape_meta(meta: &RowMeta, from: &TableDef, to: &TableDef, dropped: &BTreeSet<String>) -> RowMeta {
    if !meta.is_alive() || meta.columns.is_empty() {
        return meta.clone();
    }
    let mut out = meta.clone();
    let stored = |name: &str| {
        from.column_index(name)
            .and_then(|j| meta.columns.get(j))
            .or_else(|| meta.carried.get(name))
    };
    out.columns = to
        .columns
        .iter()
        .map(|ours| {
            stored(&ours.name)
                .filter(|stored| stored.policy() == ours.policy)
                .cloned()
                .unwrap_or_else(|| ColumnMeta::fresh(ours.policy))
        })
        .collect();
    let kept = from
        .columns
        .iter()
        .zip(&meta.columns)
        .map(|(c, m)| (&c.name, m))
        .chain(&meta.carried)
        .filter(|(name, _)| to.column_index(name).is_none() && !dropped.contains(*name))
        .map(|(name, m)| (name.clone(), m.clone()))
        .collect();
    out.carried = kept;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ChangeKind, RowKey};
    use crate::hlc::{Hlc, NodeId};
    use crate::schema::{ColumnDef, KeyColumn};
    use crate::state::{RowState, Version};

    fn def(columns: &[(&str, ColumnType, ColumnPolicy)]) -> TableDef {
        TableDef::new(
            "shop.items",
            vec![KeyColumn {
                name: "id".into(),
                ty: ColumnType::BigInt,
            }],
            columns
                .iter()
                .map(|(name, ty, policy)| ColumnDef {
                    name: (*name).into(),
                    ty: ty.clone(),
                    policy: *policy,
                })
                .collect(),
        )
        .expect("a valid table")
    }

    fn change(table: &TableDef, values: Vec<Value>) -> RowChange {
        let stamp = Hlc::new(10, 0, NodeId(1));
        let version = Version { stamp, dot: 1 };
        let mut meta = RowMeta::absent();
        meta.causal_length = 1;
        meta.stamp = Some(stamp);
        meta.columns = table
            .columns
            .iter()
            .map(|c| match c.policy {
                ColumnPolicy::Lww => ColumnMeta::Lww(Some(version)),
                other => ColumnMeta::fresh(other),
            })
            .collect();
        RowChange {
            shape: None,
            table: table.name.clone(),
            key: RowKey(vec![Value::Int(7)]),
            kind: ChangeKind::Insert,
            origin: NodeId(1),
            stamp,
            seq: 1,
            tx_last: 1,
            builds_on: Vec::new(),
            row: RowState {
                meta,
                values: values.into_iter().map(Cell::Value).collect(),
            },
            closures: Vec::new(),
        }
    }

    use ColumnPolicy::{Delta, Lww};
    use ColumnType::{BigInt, Integer};

    #[test]
    fn shape_ids_are_pinned() {
        // Stored in `accord.shapes` and compared across nodes and versions: they must not change.
        let numeric = ColumnType::Numeric {
            precision: Some(12),
            scale: Some(2),
        };
        let plain = def(&[
            ("name", ColumnType::Other("text".into()), Lww),
            ("stock", BigInt, Delta),
            ("price", numeric, ColumnPolicy::Review),
        ]);
        let review = plain.clone().with_inserts(InsertPolicy::Review);
        let ids = [plain.shape_id(), review.shape_id()].map(|id| id.to_string());
        assert_eq!(ids, ["e7f5b19135e15530", "f2dc32cb261e1d46"]);
    }

    #[test]
    fn shapes_differ_by_any_name_type_or_policy() {
        let a = def(&[("name", ColumnType::Other("text".into()), Lww)]);
        assert_eq!(a.shape_id(), a.clone().shape_id());
        for other in [
            def(&[("title", ColumnType::Other("text".into()), Lww)]),
            def(&[("name", ColumnType::Other("varchar".into()), Lww)]),
            def(&[("name", ColumnType::Other("text".into()), ColumnPolicy::Review)]),
            def(&[("name", ColumnType::Other("text".into()), Lww), ("sold", BigInt, Delta)]),
        ] {
            assert_ne!(a.shape_id(), other.shape_id(), "{other:?}");
        }
    }

    #[test]
    fn columns_are_matched_by_name_not_position() {
        let theirs = def(&[("b", Integer, Lww), ("a", Integer, Lww)]);
        let ours = LocalTable::plain(def(&[("a", BigInt, Lww), ("b", BigInt, Lww)]));
        let Reshaped::Ready(read) =
            reshape_change(&change(&theirs, vec![Value::Int(2), Value::Int(1)]), &theirs, &ours).unwrap()
        else {
            panic!("integer into bigint holds");
        };
        assert_eq!(
            read.row.values,
            vec![Cell::Value(Value::Int(1)), Cell::Value(Value::Int(2))]
        );
    }

    #[test]
    fn a_column_the_sender_lacks_is_left_to_the_receiver() {
        let theirs = def(&[("name", Integer, Lww)]);
        let mut ours = LocalTable::plain(def(&[("name", Integer, Lww), ("sold", BigInt, Delta)]));
        ours.defaults[1] = Some(Value::Int(0));
        let Reshaped::Ready(read) = reshape_change(&change(&theirs, vec![Value::Int(5)]), &theirs, &ours).unwrap()
        else {
            panic!("nothing to wait for");
        };
        assert_eq!(read.row.values[1], Cell::Value(Value::Int(0)));
        assert_eq!(read.row.meta.columns[1], ColumnMeta::fresh(Delta));
    }

    #[test]
    fn a_column_the_receiver_has_not_added_yet_waits_and_a_dropped_one_is_ignored() {
        let theirs = def(&[("name", Integer, Lww), ("sold", BigInt, Delta)]);
        let mut ours = LocalTable::plain(def(&[("name", Integer, Lww)]));
        let sent = change(&theirs, vec![Value::Int(5), Value::Int(3)]);
        assert_eq!(
            reshape_change(&sent, &theirs, &ours).unwrap(),
            Reshaped::Waits {
                columns: vec!["sold".into()]
            }
        );
        ours.dropped.insert("sold".into());
        let Reshaped::Ready(read) = reshape_change(&sent, &theirs, &ours).unwrap() else {
            panic!("a dropped column is ignored");
        };
        assert_eq!(read.row.values, vec![Cell::Value(Value::Int(5))]);
    }

    #[test]
    fn a_wider_column_there_waits_for_the_same_here() {
        let theirs = def(&[("n", BigInt, Lww)]);
        let ours = LocalTable::plain(def(&[("n", Integer, Lww)]));
        assert_eq!(
            reshape_change(&change(&theirs, vec![Value::Int(1 << 40)]), &theirs, &ours).unwrap(),
            Reshaped::Waits {
                columns: vec!["n".into()]
            }
        );
    }

    #[test]
    fn a_policy_that_differs_is_refused() {
        let theirs = def(&[("n", BigInt, Lww)]);
        let ours = LocalTable::plain(def(&[("n", BigInt, Delta)]));
        let err = reshape_change(&change(&theirs, vec![Value::Int(1)]), &theirs, &ours).unwrap_err();
        assert!(err.to_string().contains("shop.items.n"), "{err}");
    }

    #[test]
    fn widening_is_what_holds_every_value() {
        let numeric = |p, s| ColumnType::Numeric {
            precision: Some(p),
            scale: Some(s),
        };
        let any = ColumnType::Numeric {
            precision: None,
            scale: None,
        };
        assert!(holds(&BigInt, &Integer));
        assert!(holds(&Integer, &ColumnType::SmallInt));
        assert!(!holds(&Integer, &BigInt));
        assert!(holds(&numeric(12, 2), &numeric(10, 2)));
        assert!(!holds(&numeric(12, 1), &numeric(10, 2)));
        assert!(!holds(&numeric(10, 2), &numeric(12, 2)));
        assert!(holds(&numeric(12, 2), &Integer));
        assert!(!holds(&numeric(9, 0), &Integer));
        assert!(holds(&any, &numeric(10, 2)));
        assert!(holds(&any, &BigInt));
        assert!(!holds(&numeric(30, 2), &any));
        assert!(holds(&ColumnType::DoublePrecision, &ColumnType::Real));
        let other = |s: &str| ColumnType::Other(s.into());
        assert!(holds(&other("character varying(20)"), &other("character varying(10)")));
        assert!(holds(&other("text"), &other("character varying(10)")));
        assert!(!holds(&other("character varying(5)"), &other("character varying(10)")));
        assert!(!holds(&other("text"), &other("jsonb")));
    }

    #[test]
    fn stored_metadata_is_read_under_the_shape_it_names_or_the_first_one() {
        let before = def(&[("a", Integer, Lww)]);
        let after = def(&[("a", Integer, Lww), ("sold", BigInt, Delta)]);
        let stored = change(&before, vec![Value::Int(1)]).row.meta;
        let mut book = ShapeBook::default();
        // Unknown shape: refused, never read by position.
        assert!(book
            .stored_meta(stored.clone(), Some(before.shape_id()), &after)
            .is_err());
        book.learn(before.clone());
        let read = book
            .stored_meta(stored.clone(), Some(before.shape_id()), &after)
            .unwrap();
        assert_eq!(read.columns.len(), 2);
        // Stored before shapes were named: under the table's first recorded shape.
        assert_eq!(book.stored_meta(stored.clone(), None, &before).unwrap(), stored);
        book.set_unnamed("shop.items", before.shape_id());
        assert_eq!(book.stored_meta(stored, None, &after).unwrap(), read);
    }

    #[test]
    fn stored_metadata_follows_the_nodes_own_shapes() {
        let before = def(&[("a", Integer, Lww), ("gone", Integer, Lww)]);
        let after = def(&[("sold", BigInt, Delta), ("a", Integer, Lww)]);
        let stored = change(&before, vec![Value::Int(1), Value::Int(2)]).row.meta;
        let read = reshape_meta(&stored, &before, &after, &["gone".to_owned()].into());
        assert_eq!(read.columns, vec![ColumnMeta::fresh(Delta), stored.columns[0].clone()]);
        assert!(read.carried.is_empty(), "a dropped column's metadata goes");
    }

    #[test]
    fn a_reader_behind_the_latest_shape_keeps_what_it_does_not_know() {
        let narrow = def(&[("a", Integer, Lww)]);
        let wide = def(&[("a", Integer, Lww), ("sold", Integer, Lww)]);
        let stored = change(&wide, vec![Value::Int(1), Value::Int(2)]).row.meta;
        let behind = reshape_meta(&stored, &wide, &narrow, &BTreeSet::new());
        assert_eq!(behind.columns, vec![stored.columns[0].clone()]);
        assert_eq!(behind.carried.get("sold"), Some(&stored.columns[1]));
        // Written back under the narrow shape and read under the wide one: nothing lost.
        let again = reshape_meta(&behind, &narrow, &wide, &BTreeSet::new());
        assert_eq!(again.columns, stored.columns);
        assert!(again.carried.is_empty());
    }
}
