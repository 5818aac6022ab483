//! The cluster's membership as each database keeps it (`accord.members`): one row per node, the
//! `engine::Membership` entry plus what the running node last worked out about who knows it.
//!
//! Three writers share the table: the running node (entries merged from its peers' gossip),
//! `accord join` (a joining node's entry, written into the donor's database, and the joined node's
//! own), and `accord leave` (a `left` entry). Every write goes through [`write`], which keeps the
//! row only if the new entry supersedes it (the engine's rule, in SQL), so no writer can undo
//! another's and the running node picks up the commands' writes by reading the table.

use accord_engine::{Hlc, Member, MemberState, NodeId};
use tokio_postgres::GenericClient;

use super::store::StoreError;

pub const MEMBERS_DDL: &str = "
CREATE TABLE IF NOT EXISTS accord.members (
    node_id        integer PRIMARY KEY,
    state          text    NOT NULL CHECK (state IN ('joining', 'active', 'left')),
    address        text    NOT NULL,
    stamp_physical bigint  NOT NULL,
    stamp_logical  integer NOT NULL,
    stamp_node     integer NOT NULL,
    -- Live nodes that have not said they hold this entry, as the running node last saw it;
    -- NULL until it looked.
    not_known_by   integer[],
    updated_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE accord.members IS 'accord: the cluster''s nodes, as this node knows them';
";

/// The engine's order of entries (`Member::supersedes`), in SQL: state rank, stamp, address in
/// byte order.
const WRITE_SQL: &str = "
INSERT INTO accord.members AS m (node_id, state, address, stamp_physical, stamp_logical, stamp_node)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (node_id) DO UPDATE
SET state = EXCLUDED.state, address = EXCLUDED.address, stamp_physical = EXCLUDED.stamp_physical,
    stamp_logical = EXCLUDED.stamp_logical, stamp_node = EXCLUDED.stamp_node, not_known_by = NULL,
    updated_at = now()
WHERE (array_position(ARRAY['joining', 'active', 'left'], EXCLUDED.state), EXCLUDED.stamp_physical,
       EXCLUDED.stamp_logical, EXCLUDED.stamp_node, EXCLUDED.address COLLATE \"C\")
    > (array_position(ARRAY['joining', 'active', 'left'], m.state), m.stamp_physical,
       m.stamp_logical, m.stamp_node, m.address COLLATE \"C\")";

/// Writes an entry unless the table holds one that supersedes it. Returns whether it was written.
pub async fn write(db: &impl GenericClient, member: &Member) -> Result<bool, StoreError> {
    let written = db
        .execute(
            WRITE_SQL,
            &[
                &(member.node.0 as i32),
                &member.state.as_str(),
                &member.address,
                &(member.stamp.physical as i64),
                &(member.stamp.logical as i32),
                &(member.stamp.node.0 as i32),
            ],
        )
        .await?;
    Ok(written > 0)
}

/// Every entry in the table.
pub async fn load(db: &impl GenericClient) -> Result<Vec<Member>, StoreError> {
    let rows = db
        .query(
            "SELECT node_id, state, address, stamp_physical, stamp_logical, stamp_node
             FROM accord.members ORDER BY node_id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let state: &str = row.get(1);
            let state = MemberState::parse(state)
                .ok_or_else(|| StoreError::Corrupt(format!("accord.members: unknown state {state:?}")))?;
            Ok(Member {
                node: NodeId(row.get::<_, i32>(0) as u32),
                state,
                address: row.get(2),
                stamp: Hlc::new(
                    row.get::<_, i64>(3) as u64,
                    row.get::<_, i32>(4) as u32,
                    NodeId(row.get::<_, i32>(5) as u32),
                ),
            })
        })
        .collect()
}

/// Records which live nodes have not said they hold `node`'s entry.
pub async fn record_not_known_by(db: &impl GenericClient, node: NodeId, nodes: &[NodeId]) -> Result<(), StoreError> {
    let nodes: Vec<i32> = nodes.iter().map(|n| n.0 as i32).collect();
    db.execute(
        "UPDATE accord.members SET not_known_by = $2 WHERE node_id = $1 AND not_known_by IS DISTINCT FROM $2",
        &[&(node.0 as i32), &nodes],
    )
    .await?;
    Ok(())
}

/// `node`'s entry and the live nodes that have not said they hold it (`None`: the running node
/// has not looked since the entry was written).
pub async fn entry_known(
    db: &impl GenericClient,
    node: NodeId,
) -> Result<Option<(MemberState, Option<Vec<NodeId>>)>, StoreError> {
    let row = db
        .query_opt(
            "SELECT state, not_known_by FROM accord.members WHERE node_id = $1",
            &[&(node.0 as i32)],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let state: &str = row.get(0);
    let state = MemberState::parse(state)
        .ok_or_else(|| StoreError::Corrupt(format!("accord.members: unknown state {state:?}")))?;
    let nodes: Option<Vec<i32>> = row.get(1);
    Ok(Some((
        state,
        nodes.map(|n| n.into_iter().map(|n| NodeId(n as u32)).collect()),
    )))
}
