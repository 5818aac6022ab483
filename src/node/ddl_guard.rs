//! DDL on a replicated table that accord cannot follow is refused in the statement's own
//! transaction (issue 17), by an event trigger `accord init` installs (it takes a superuser):
//! - renaming a replicated table or one of its columns: peers go on sending the old name, which
//!   this node would read as a column it dropped (and ignore its values), while its own changes
//!   name a column its peers lack;
//! - changing the `@accord` tag of a replicated column: the capture and the appliers would go on
//!   under the policy they read until they read the table again, and nodes would merge the
//!   column's history under two policies. A column added in the same transaction may be tagged.
//!
//! The trigger compares the catalog with what it saw last (`accord.replicated_columns`, by
//! table oid and column number, which a rename keeps and a drop and re-add does not), then
//! records what it sees now. Everything else (adding, dropping, widening a column; new tables)
//! the nodes follow (`tagging`, `engine::shape`).

/// Installed by `accord init` and by a node starting on a database initialised before it.
pub const GUARD_DDL: &str = r#"
CREATE TABLE IF NOT EXISTS accord.replicated_columns (
    table_oid   oid      NOT NULL,
    attnum      smallint NOT NULL,
    table_name  text     NOT NULL,
    column_name text     NOT NULL,
    tag         text,
    added_in    xid8     NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (table_oid, attnum)
);
COMMENT ON TABLE accord.replicated_columns IS 'accord: the replicated columns as the DDL guard last saw them';
CREATE OR REPLACE FUNCTION accord.column_tag(description text) RETURNS text
LANGUAGE sql IMMUTABLE AS $accord$
    SELECT substring(description FROM '@accord\s+(lww|delta|review)\M')
$accord$;
CREATE OR REPLACE FUNCTION accord.record_replicated_columns() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $accord$
BEGIN
    -- What it sees now: the columns of the tables accord publishes (tagged or taken in).
    DELETE FROM accord.replicated_columns s
     WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = s.table_oid AND a.attnum = s.attnum AND NOT a.attisdropped)
        OR NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                        WHERE p.pubname = 'accord_pub' AND r.prrelid = s.table_oid);
    INSERT INTO accord.replicated_columns AS s (table_oid, attnum, table_name, column_name, tag)
    SELECT c.oid, a.attnum, n.nspname || '.' || c.relname, a.attname, accord.column_tag(d.description)
      FROM pg_publication p
      JOIN pg_publication_rel r ON r.prpubid = p.oid
      JOIN pg_class c ON c.oid = r.prrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = a.attnum
     WHERE p.pubname = 'accord_pub' AND n.nspname <> 'accord'
    ON CONFLICT (table_oid, attnum) DO UPDATE
       SET table_name = EXCLUDED.table_name, column_name = EXCLUDED.column_name, tag = EXCLUDED.tag
     WHERE (s.table_name, s.column_name, s.tag) IS DISTINCT FROM (EXCLUDED.table_name, EXCLUDED.column_name, EXCLUDED.tag);
END
$accord$;
CREATE OR REPLACE FUNCTION accord.guard_replicated_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $accord$
DECLARE
    seen record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'accord_pub') THEN
        RETURN;
    END IF;
    FOR seen IN
        SELECT s.table_name, s.column_name, s.tag, s.added_in = pg_current_xact_id() AS added_now,
               n.nspname || '.' || c.relname AS table_now, a.attname AS column_now, a.attisdropped,
               accord.column_tag(d.description) AS tag_now
          FROM accord.replicated_columns s
          JOIN pg_class c ON c.oid = s.table_oid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_attribute a ON a.attrelid = s.table_oid AND a.attnum = s.attnum
          LEFT JOIN pg_description d
                 ON d.objoid = s.table_oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = s.attnum
    LOOP
        CONTINUE WHEN seen.attisdropped;
        IF seen.table_now <> seen.table_name THEN
            RAISE EXCEPTION 'accord: % is replicated, and renaming a replicated table while the cluster runs is not supported', seen.table_name
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Create the table under its new name, tagged @accord replicate, copy the rows, then drop the old one.';
        END IF;
        IF seen.column_now <> seen.column_name THEN
            RAISE EXCEPTION 'accord: %.% is replicated, and renaming a replicated column while the cluster runs is not supported: peers would go on sending it under its old name', seen.table_name, seen.column_name
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Add a column with the new name, copy the values (UPDATE ... SET new = old), and drop the old column once every node has the new one.';
        END IF;
        IF coalesce(seen.tag, '') <> coalesce(seen.tag_now, '') AND NOT seen.added_now THEN
            RAISE EXCEPTION 'accord: %.% is replicated as @accord %, and changing a replicated column''s policy while the cluster runs is not supported: nodes would merge its history under two policies', seen.table_name, seen.column_name, coalesce(seen.tag, 'lww (no tag)')
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Add a column with the new tag, copy the values into it, and drop the old column once every node has the new one.';
        END IF;
    END LOOP;
    PERFORM accord.record_replicated_columns();
END
$accord$;
"#;

/// Installed by `accord init` where it may (a superuser's). `ddl_command_end` covers `ALTER
/// TABLE` (renames, columns) and `COMMENT` (tags).
pub const GUARD_TRIGGER: &str = "
DROP EVENT TRIGGER IF EXISTS accord_guard_replicated_tables;
CREATE EVENT TRIGGER accord_guard_replicated_tables ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'COMMENT')
    EXECUTE FUNCTION accord.guard_replicated_tables();
";
