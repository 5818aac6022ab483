//! Several statements in flight on one connection at once, and a cache of prepared statements.
//!
//! tokio-postgres sends a query when its future is first polled and matches the responses in
//! order, so polling many query futures together sends them back to back: one network round trip
//! for all of them instead of one each. PostgreSQL still runs them one after another, in the order
//! they were sent, inside the same transaction.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, GenericClient, Row, Statement};

/// One statement of a pipeline.
pub type Query<'a> = Pin<Box<dyn Future<Output = Result<Vec<Row>, Error>> + Send + 'a>>;

/// Owned parameters of a statement, kept alive while its query is in flight.
pub type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// Owned parameters as tokio-postgres's query methods take them.
pub fn param_refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// A query of a prepared statement with owned parameters.
pub fn query<'a, C: GenericClient + Sync>(db: &'a C, statement: &'a Statement, params: &'a Params) -> Query<'a> {
    Box::pin(async move { db.query(statement, &param_refs(params)).await })
}

/// A simple-protocol command (no parameters, no rows), such as `SAVEPOINT`.
pub fn command<'a, C: GenericClient + Sync>(db: &'a C, sql: &'a str) -> Query<'a> {
    Box::pin(async move { db.batch_execute(sql).await.map(|()| Vec::new()) })
}

/// Runs `queries` together and returns their results in the same order. Every query is driven to
/// its end, also after one failed: PostgreSQL answers each of them, and a later statement's error
/// may only be a consequence of an earlier one (`current transaction is aborted`).
pub async fn join_all(queries: Vec<Query<'_>>) -> Vec<Result<Vec<Row>, Error>> {
    let mut queries = queries;
    let mut results: Vec<Option<Result<Vec<Row>, Error>>> = queries.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        // In order: the first poll of each query is what sends it.
        for (query, result) in queries.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match query.as_mut().poll(cx) {
                    Poll::Ready(done) => *result = Some(done),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    // Every slot was filled before the loop above returned Ready.
    results.into_iter().flatten().collect()
}

/// Runs `queries` together; the first error, if any (an earlier statement's error is the cause of
/// the later ones).
pub async fn run_all(queries: Vec<Query<'_>>) -> Result<Vec<Vec<Row>>, Error> {
    join_all(queries).await.into_iter().collect()
}

/// Like [`run_all`], with each statement's own outcome (after a failed one, the rest of its
/// transaction fails too).
pub async fn run_each(queries: Vec<Query<'_>>) -> Vec<Result<Vec<Row>, Error>> {
    join_all(queries).await
}

/// At most this many statements stay prepared on a connection (updates of many different sets of
/// columns each have their own).
const MAX_PREPARED: usize = 256;

/// Makes a session plan each prepared statement once, for sessions that run the same
/// statements on every batch (the capture's, the appliers'). Their statements join arrays of
/// keys (`unnest`) to tables by primary key, and PostgreSQL kept planning them anew at every
/// execution (a custom plan per batch): about 0.2 ms a statement, several statements a batch;
/// planned once, an idle change's lag fell from 5.8 to 5.0 ms (docs/benchmarks.md, 2026-12-07
/// evening). The one plan is an index lookup per key whatever the batch's size, which the drain
/// measured as fast as the plans made per batch.
pub const PLAN_ONCE_SQL: &str = "SET plan_cache_mode = force_generic_plan";

/// Prepared statements by SQL text, for one connection.
#[derive(Default)]
pub struct Statements {
    prepared: HashMap<String, Statement>,
}

impl Statements {
    /// The prepared statement for `sql`, prepared on first use.
    pub async fn get(&mut self, db: &impl GenericClient, sql: &str) -> Result<Statement, Error> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = db.prepare(sql).await?;
        if self.prepared.len() >= MAX_PREPARED {
            // Start over rather than grow without bound (dropped statements are closed).
            self.prepared.clear();
        }
        self.prepared.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}
