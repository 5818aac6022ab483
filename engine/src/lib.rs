//! accord's engine: the merge rules and the replication logic of a node, as plain state machines.
//!
//! Nothing here does I/O, reads a clock or draws randomness: the service drives this code with
//! PostgreSQL and QUIC, the simulator with simulated ones, and both get the same decisions.

pub mod acknowledge;
pub mod apply;
pub mod apply_queue;
pub mod capture;
pub mod capture_group;
pub mod capturer;
pub mod change;
pub mod collection;
pub mod hlc;
pub mod join;
pub mod membership;
pub mod merge;
pub mod protocol;
pub mod replication;
pub mod review;
pub mod schema;
pub mod shape;
pub mod state;
pub mod value;
pub mod verify;

pub use acknowledge::AppliedPosition;
pub use apply::{
    fold, judge, ApplyCommand, ApplyError, ApplyInput, ApplyRules, ApplySummary, BatchApply, Carried, ConflictCounts,
    KeyLocks, LoadedRow, PlannedWrite, PlantedBug, Records, RemovalCount, RemovalLedger, RowWrite, Segment, Segments,
    Verdict, WriteRefusal, Xid,
};
pub use apply_queue::{transactions_before_waiting, ApplyQueue, Handout, InFlight, MAX_APPLY_BATCH};
pub use capture::{capture, CaptureError, Captured};
pub use capture_group::{
    CaptureStop, CapturedRow, DecodedRow, DecodedTransaction, GroupWrite, MetaWrite, TransactionPart, Truncate,
    OPEN_TRANSACTION,
};
pub use capturer::{CaptureCheckpoint, Capturer};
pub use change::{CapturedChange, ChangeKind, RowChange, RowKey};
pub use collection::{Ack1, CollectionState, Collector, StableCut};
pub use hlc::{ClockError, Hlc, HlcClock, NodeId, DEFAULT_MAX_OFFSET_MICROS};
pub use join::{judge_copy, settle, settle_try, CopyVerdict, JoinPositions, SettleTry, Settled, MAX_SETTLES};
pub use membership::{Member, MemberState, Membership};
pub use merge::{merge, open_items, ColumnWrite, Conflict, ConflictKind, MergeError, MergeOutcome, Merged, RowAction};
pub use protocol::{Hello, LocalIdentity, Message, Refusal, PROTOCOL_VERSION};
pub use replication::{MembershipChange, PeerProgress, Replication, ReplicationConfig, ReplicationError};
pub use review::{ClosureKind, ReviewAction, ReviewClosure, ReviewItem, ReviewItemId, ReviewKind};
pub use schema::{ColumnDef, ColumnPolicy, ColumnType, InsertPolicy, KeyColumn, SchemaError, TableDef};
pub use shape::{
    holds, reshape_change, reshape_meta, LocalTable, NodeSchema, Reading, Reshaped, ShapeBook, ShapeError, ShapeId,
};
pub use state::{
    Candidate, Cell, ColumnMeta, Contribution, DeltaLedger, DisplacedColumn, DisplacedInsert, ReviewRegister, RowMeta,
    RowState, Version,
};
pub use value::{Amount, Value, ValueError};
pub use verify::{
    as_good_as_absent, compare_rows, compare_summaries, repair_plan, row_digest, rows_by_key, split, standing, stored,
    BucketSums, BucketTally, Descent, DescentStep, HashRange, HeldRow, KeyDifference, KeyHasher, RangeSummary,
    RepairOutcome, RepairPlan, RepairWrite, RowSummary, RowVerdicts, RowVersion, Standing, Stored, TableCount,
    TableSummaries, VerifyCut, VerifyMessage, VerifyScope, FANOUT,
};
