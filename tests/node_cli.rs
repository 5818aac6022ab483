//! `accord init` and `accord review` as a user runs them, on a real temporary cluster.

mod support;

use support::cli::accord;
use support::nodes::SHOP;
use support::pg::PgCluster;

#[tokio::test]
async fn init_prepares_a_database_once_and_refuses_mistakes() {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let db = pg.create_database("shop").await;
    db.batch_execute(SHOP).await.unwrap();
    db.batch_execute("INSERT INTO shop.products (id, name) VALUES (1, 'old row')")
        .await
        .unwrap();
    let dsn = pg.dsn("shop");

    let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", "1"]);
    assert!(ok, "{out}");
    assert!(out.contains("shop.products") && out.contains("shop.users"), "{out}");
    assert!(out.contains("1 existing rows recorded"), "{out}");
    let identity: String = db
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = 'shop.products'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(identity, "f", "REPLICA IDENTITY FULL");

    let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", "1"]);
    assert!(ok, "running init again is fine: {out}");
    let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", "2"]);
    assert!(!ok && out.contains("already node 1"), "{out}");

    db.batch_execute("COMMENT ON COLUMN shop.users.name IS '@accord detla'")
        .await
        .unwrap();
    let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", "1"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("detla") && out.contains("delta"),
        "names the word and the fix: {out}"
    );
    db.batch_execute("COMMENT ON COLUMN shop.users.name IS NULL")
        .await
        .unwrap();

    let (ok, out) = accord(&["review", "list", "--dsn", &dsn]);
    assert!(ok && out.contains("no open review items"), "{out}");
    let (ok, out) = accord(&["review", "resolve", "00000000000000ff", "--dsn", &dsn, "--pick", "1"]);
    assert!(!ok && out.contains("no review item 00000000000000ff"), "{out}");
}

/// The key-lock triggers `accord init` installs: a local insert takes its key's bucket shared,
/// an update takes it only when it changes the key, an applier's session (`accord.applying`)
/// takes none; the bucket is the one the apply locks for the same key. And a user's own
/// `BEFORE` trigger that sets the key runs first, so the lock is on the key it set.
#[tokio::test]
async fn init_installs_triggers_that_lock_inserted_keys_the_way_the_apply_does() {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let db = pg.create_database("shop").await;
    db.batch_execute(SHOP).await.unwrap();
    db.batch_execute(
        "CREATE FUNCTION shop.shift_id() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.id := NEW.id + 1000; RETURN NEW; END $$;
         CREATE TRIGGER shift_id BEFORE INSERT ON shop.users FOR EACH ROW EXECUTE FUNCTION shop.shift_id();",
    )
    .await
    .unwrap();
    let (ok, out) = accord(&["init", "--dsn", &pg.dsn("shop"), "--node-id", "1"]);
    assert!(ok, "{out}");
    // Buckets held by this session, as (bucket, mode).
    let held = "SELECT objid::bigint, mode FROM pg_locks WHERE locktype = 'advisory' AND classid = 1633907300 \
                AND pid = pg_backend_pid() ORDER BY 1, 2";
    let bucket = |table: &str, key: i64| {
        format!("SELECT ((hashtext('{table}') # hash_record(ROW(('{key}')::bigint))) & 255)::bigint")
    };
    let bucket_of = |table: &'static str, key: i64| {
        let db = &db;
        async move { db.query_one(&bucket(table, key), &[]).await.unwrap().get::<_, i64>(0) }
    };
    // Runs `sql` in a new transaction and returns the buckets it holds, as (bucket, mode).
    let held_after = |sql: &'static str| {
        let db = &db;
        async move {
            db.batch_execute(&format!("BEGIN; {sql}")).await.unwrap();
            let rows = db.query(held, &[]).await.unwrap();
            db.batch_execute("COMMIT").await.unwrap();
            rows.iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect::<Vec<(i64, String)>>()
        }
    };
    let shared = |bucket: i64| vec![(bucket, "ShareLock".to_owned())];

    assert_eq!(
        held_after("INSERT INTO shop.products (id, name) VALUES (7, 'seven')").await,
        shared(bucket_of("shop.products", 7).await),
        "the insert holds its key's bucket, shared"
    );
    assert!(
        held_after("UPDATE shop.products SET name = 'renamed' WHERE id = 7")
            .await
            .is_empty(),
        "an update that keeps the key takes nothing"
    );
    // The removal lock, beside the buckets: a transaction that removed a key holds it shared
    // until it ends, for the apply's count at rest (key_locks.rs).
    let removal = (256, "ShareLock".to_owned());
    let mut moved = shared(bucket_of("shop.products", 8).await);
    moved.push(removal.clone());
    assert_eq!(
        held_after("UPDATE shop.products SET id = 8 WHERE id = 7").await,
        moved,
        "an update to a new key holds the new key's bucket, and the removal lock for the old key"
    );
    assert_eq!(
        held_after("DELETE FROM shop.products WHERE id = 8; INSERT INTO shop.products (id, name) VALUES (8, 'eight')")
            .await,
        vec![(bucket_of("shop.products", 8).await, "ShareLock".to_owned()), removal],
        "a delete holds the removal lock, an insert its key's bucket"
    );
    // An application's role with rights on its tables only: its inserts and deletes go through
    // accord's triggers, and its delete counts (as the function's owner).
    let counted = || async {
        db.query_one("SELECT last_value FROM accord.local_removals", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let before = counted().await;
    db.batch_execute(
        "CREATE ROLE shop_app; GRANT USAGE ON SCHEMA shop TO shop_app; \
         GRANT SELECT, INSERT, DELETE ON shop.products TO shop_app; \
         BEGIN; SET LOCAL ROLE shop_app; \
         INSERT INTO shop.products (id, name) VALUES (10, 'ten'); DELETE FROM shop.products WHERE id = 10; \
         COMMIT",
    )
    .await
    .expect("an application's role writes without rights on accord's schema");
    assert_eq!(counted().await, before + 1, "the application's delete counted");
    assert_eq!(
        held_after("INSERT INTO shop.users (id, email) VALUES (1, 'a@example.com')").await,
        shared(bucket_of("shop.users", 1001).await),
        "the key the user's own trigger set"
    );
    assert!(
        held_after("SET LOCAL accord.applying = on; INSERT INTO shop.products (id, name) VALUES (9, 'nine')")
            .await
            .is_empty(),
        "an applier locks its keys itself"
    );

    // The apply's statement locks the same bucket for the same key.
    let table = accord_engine::TableDef::new(
        "shop.products",
        vec![accord_engine::KeyColumn {
            name: "id".into(),
            ty: accord_engine::ColumnType::BigInt,
        }],
        Vec::new(),
    )
    .unwrap();
    let sql = accord::node::key_locks::lock_keys_sql(&[&table]);
    let held_now = || async {
        let rows = db.query(held, &[]).await.unwrap();
        rows.iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect::<Vec<(i64, String)>>()
    };
    db.batch_execute("BEGIN").await.unwrap();
    let taken: Option<bool> = db
        .query_one(&sql, &[&vec![0i32], &vec![Some("42".to_owned())]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(taken, Some(true));
    db.batch_execute("COMMIT").await.unwrap();
    let exclusive = vec![(bucket_of("shop.products", 42).await, "ExclusiveLock".to_owned())];
    assert_eq!(held_now().await, exclusive, "held past the commit, until released");
    db.batch_execute(accord::node::key_locks::UNLOCK_SQL).await.unwrap();
    assert!(held_now().await.is_empty());
}
