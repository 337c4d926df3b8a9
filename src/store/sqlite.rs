//! The embedded SQLite store: WAL, versioned migrations, and group commits.
//!
//! One writer thread owns the connection. Every operation is a job sent to it; the thread
//! takes all the jobs waiting, runs each (most inside a SAVEPOINT of their own, so that one
//! failing job rolls back alone; see `SqliteStore::run_unguarded` for those that are not),
//! commits them with one COMMIT, and only then answers each caller. Many HTTP
//! requests acknowledged in the same millisecond thus share one write to the WAL, and no
//! caller hears "stored" before its row is committed.

use super::*;
use patchbay_channel_core::Accepted;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::mpsc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

use crate::config::SqliteSynchronous;

type Done = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A job's answer to the writer: what to do once the commit is decided, and whether the job
/// failed after it had changed rows that no savepoint of its own can take back (then the
/// whole group commit is rolled back; see `SqliteStore::run_unguarded`).
type Ran = (Done, bool);
enum Job {
    Run(Box<dyn FnOnce(&Connection) -> Ran + Send>),
    Close(oneshot::Sender<()>),
}

/// How often the checkpointer folds the WAL back into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// WAL pages (4 KiB; 1 GiB) past which the writer finishes a checkpoint itself (see
/// `writer`). That pause (copying what the checkpointer has not yet, and an fsync: up to
/// hundreds of milliseconds on a busy disk) is a last resort against a WAL that would grow
/// without end under load that never lets up; at 128 MiB it came every few seconds of a
/// 5,000 msg/s benchmark and took the Mattermost ack p99 from 3.3 to 9.9 ms. Otherwise the
/// WAL starts over on its own after the checkpointer's next pass.
const WAL_RESTART_PAGES: i64 = 256 * 1024;

/// Past this size the WAL file is cut back (to nothing) once the store has been idle for
/// `WAL_IDLE_TICKS` checkpointer passes. Not while it is busy: SQLite's own limit
/// (`journal_size_limit`) cuts the file at each restart, and under load each cut freed
/// hundreds of MB of blocks while the writer waited (web chat echo: writer stalls of 300+
/// ms), and then every block of the regrown file was new to the file system again (the
/// kernel zeroing fresh blocks took ~10% of the writer's CPU). So while busy the file keeps
/// its largest size, at most about `WAL_RESTART_PAGES`.
const WAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// Checkpointer passes (CHECKPOINT_EVERY each) without a commit after which the store counts
/// as idle: 5 s.
const WAL_IDLE_TICKS: u32 = 50;

/// The most jobs one commit takes: bounds the latency a job can add to its neighbours.
const MAX_GROUP: usize = 2048;

/// Schema versions, applied in order; `PRAGMA user_version` records the last one applied.
const MIGRATIONS: &[&str] = &[
    // 1: registry, queues, dedupe, conversations, dead letters.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('registry_version', 0);
    CREATE TABLE assistants (
        id TEXT PRIMARY KEY, backend TEXT NOT NULL, settings TEXT NOT NULL,
        sealed_secrets BLOB, api_key_hash TEXT, source TEXT NOT NULL,
        created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
    CREATE TABLE channels (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, assistant TEXT NOT NULL,
        enabled INTEGER NOT NULL, hook_id TEXT NOT NULL UNIQUE, settings TEXT NOT NULL,
        sealed_secrets BLOB, source TEXT NOT NULL,
        created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
    CREATE TABLE dedupe (
        channel_id TEXT NOT NULL, event_id TEXT NOT NULL, expires_at INTEGER NOT NULL,
        PRIMARY KEY (channel_id, event_id)) WITHOUT ROWID;
    CREATE INDEX dedupe_expiry ON dedupe (expires_at);
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY, channel_id TEXT NOT NULL, event_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL, payload TEXT NOT NULL, received_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, next_at INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT, lease_until INTEGER NOT NULL DEFAULT 0, last_error TEXT);
    CREATE INDEX inbox_conversation ON inbox (conversation_id, id);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY, reply_id TEXT NOT NULL UNIQUE, channel_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL, payload TEXT NOT NULL, received_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, next_at INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT, lease_until INTEGER NOT NULL DEFAULT 0, last_error TEXT);
    CREATE INDEX outbox_conversation ON outbox (conversation_id, id);
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY, channel_id TEXT NOT NULL, platform_conversation TEXT NOT NULL,
        thread TEXT, route TEXT NOT NULL, updated_at INTEGER NOT NULL);
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY, queue TEXT NOT NULL, channel_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
        reason TEXT NOT NULL, attempts INTEGER NOT NULL, received_at INTEGER NOT NULL,
        failed_at INTEGER NOT NULL);
    CREATE INDEX dead_letters_channel ON dead_letters (channel_id, id);
    "#,
    // 2: per-conversation message logs (web chat replay and history). The heads table keeps
    // each conversation's last sequence number, so pruning never lets a number be reused.
    r#"
    CREATE TABLE conversation_log_heads (
        channel_id TEXT NOT NULL, conversation TEXT NOT NULL, last_seq INTEGER NOT NULL,
        PRIMARY KEY (channel_id, conversation)) WITHOUT ROWID;
    CREATE TABLE conversation_log (
        channel_id TEXT NOT NULL, conversation TEXT NOT NULL, seq INTEGER NOT NULL,
        key TEXT, body TEXT NOT NULL, at INTEGER NOT NULL,
        PRIMARY KEY (channel_id, conversation, seq)) WITHOUT ROWID;
    CREATE UNIQUE INDEX conversation_log_key ON conversation_log (channel_id, conversation, key)
        WHERE key IS NOT NULL;
    CREATE INDEX conversation_log_age ON conversation_log (channel_id, at);
    "#,
    // 3: per-channel sealed key/value spaces (Slack's workspace tokens, OAuth states).
    r#"
    CREATE TABLE channel_kv (
        channel_id TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires_at INTEGER,
        PRIMARY KEY (channel_id, key)) WITHOUT ROWID;
    "#,
    // 4: the conversation logs again, laid out for appends (see `log_append`): entries in one
    // rowid table in the order they were written, found per conversation through a small
    // index of integers; conversations numbered in a table of their own. Migration 2's rows
    // are copied, then its tables dropped; `fill_key_hashes` completes the copy.
    r#"
    CREATE TABLE log_conversations (
        id INTEGER PRIMARY KEY, channel_id TEXT NOT NULL, conversation TEXT NOT NULL,
        last_seq INTEGER NOT NULL, UNIQUE (channel_id, conversation));
    INSERT INTO log_conversations (channel_id, conversation, last_seq)
        SELECT channel_id, conversation, last_seq FROM conversation_log_heads ORDER BY channel_id, conversation;
    CREATE TABLE log_entries (
        id INTEGER PRIMARY KEY, conversation INTEGER NOT NULL, seq INTEGER NOT NULL,
        key_hash INTEGER, key TEXT, body TEXT NOT NULL, at INTEGER NOT NULL);
    INSERT INTO log_entries (conversation, seq, key, body, at)
        SELECT h.id, l.seq, l.key, l.body, l.at FROM conversation_log l
        JOIN log_conversations h ON h.channel_id = l.channel_id AND h.conversation = l.conversation
        ORDER BY l.at, h.id, l.seq;
    CREATE INDEX log_entries_seq ON log_entries (conversation, seq, key_hash);
    CREATE INDEX log_entries_at ON log_entries (at);
    DROP TABLE conversation_log;
    DROP TABLE conversation_log_heads;
    "#,
];

/// Steps of a migration that SQL alone cannot do, run in its transaction after its SQL.
fn after_migration(tx: &Connection, version: usize) -> StoreResult<()> {
    if version == 4 {
        fill_key_hashes(tx)?;
    }
    Ok(())
}

/// Gives every copied log entry with a key its `key_hash` (migration 4).
fn fill_key_hashes(c: &Connection) -> StoreResult<()> {
    let keyed: Vec<(i64, String)> = c
        .prepare("SELECT id, key FROM log_entries WHERE key IS NOT NULL AND key_hash IS NULL")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(db)?;
    let mut update = c.prepare("UPDATE log_entries SET key_hash = ?1 WHERE id = ?2").map_err(db)?;
    for (id, key) in keyed {
        update.execute(params![key_hash(&key), id]).map_err(db)?;
    }
    Ok(())
}

/// How far back in a conversation an append looks for its key: a retried delivery comes
/// within a few entries of the first one, and the look-back reads only the conversation's
/// newest index entries, never its rows (unless a hash matches).
const LOG_KEY_WINDOW: i64 = 64;

/// Rows one prune job removes at most; the log is pruned in jobs of this size so that no
/// commit holds the writer for long.
const LOG_PRUNE_CHUNK: i64 = 5000;

/// A stable 64-bit hash of a log key (FNV-1a): kept in the index beside each entry's number,
/// so an append can look for its key without reading rows. A match is checked against the key
/// itself.
fn key_hash(key: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

pub struct SqliteStore {
    tx: Mutex<mpsc::Sender<Job>>,
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

impl SqliteStore {
    /// Opens (creating the file and its directory) and migrates the database.
    pub fn open(path: &Path, synchronous: SqliteSynchronous) -> StoreResult<SqliteStore> {
        Self::open_with(path, synchronous, WAL_RESTART_PAGES, true)
    }

    fn open_with(path: &Path, synchronous: SqliteSynchronous, wal_restart_pages: i64, checkpointer: bool) -> StoreResult<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path).map_err(|e| StoreError::Db(format!("cannot open {}: {e}", path.display())))?;
        let sync = match synchronous {
            SqliteSynchronous::Normal => "NORMAL",
            SqliteSynchronous::Full => "FULL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000;"
        ))
        .map_err(db)?;
        migrate(&mut conn)?;
        // Checkpoints (copying the WAL back into the database, with an fsync) would stall the
        // writer, and with it every acknowledgement, for milliseconds whenever the WAL passes
        // 1000 pages. A checkpointer thread of its own does them instead, passively (it never
        // blocks the writer), every CHECKPOINT_EVERY.
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = -1;").map_err(db)?;
        let wal = Arc::new(AtomicI64::new(0));
        // SAFETY: the hook's context is the counter, which `writer` keeps alive until after
        // the connection is dropped; the hook only stores a number.
        unsafe {
            rusqlite::ffi::sqlite3_wal_hook(conn.handle(), Some(wal_pages), Arc::as_ptr(&wal) as *mut std::ffi::c_void);
        }
        if checkpointer && path != Path::new(":memory:") {
            let checkpointer = Connection::open(path).map_err(db)?;
            checkpointer.execute_batch("PRAGMA busy_timeout = 5000;").map_err(db)?;
            let wal_file = std::path::PathBuf::from(format!("{}-wal", path.display()));
            let commits = wal.clone();
            std::thread::Builder::new()
                .name("patchbay-sqlite-ckpt".into())
                .spawn(move || {
                    // The WAL hook's page count changes with every commit: unchanged, the
                    // store was idle.
                    let (mut last, mut idle) = (commits.load(Ordering::Relaxed), 0u32);
                    loop {
                        std::thread::sleep(CHECKPOINT_EVERY);
                        let now = commits.load(Ordering::Relaxed);
                        idle = if now == last { idle.saturating_add(1) } else { 0 };
                        last = now;
                        let large = || std::fs::metadata(&wal_file).map(|m| m.len() > WAL_SIZE_LIMIT).unwrap_or(false);
                        let mode = if idle == WAL_IDLE_TICKS && large() { "TRUNCATE" } else { "PASSIVE" };
                        match checkpointer.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(())) {
                            Ok(()) => {}
                            // The database was closed and removed (tests' temporary directories).
                            Err(e) => {
                                tracing::debug!(error = %e, "checkpointer stopped");
                                return;
                            }
                        }
                    }
                })
                .map_err(db)?;
        }
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("patchbay-sqlite".into())
            .spawn(move || writer(conn, rx, wal, wal_restart_pages))
            .map_err(db)?;
        Ok(SqliteStore { tx: Mutex::new(tx) })
    }

    /// Runs `f` on the writer thread inside the next group commit, in a savepoint of its own
    /// (a failing job rolls back alone); answers after COMMIT.
    async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.job(true, f).await
    }

    /// [`SqliteStore::run`] without the job's own savepoint, for the jobs every message makes
    /// (storing, claiming, completing, logging, delivering). A savepoint copies each page the
    /// job first changes into the statement journal: about 9% of the writer's time under load
    /// (perf, web chat echo, 2026-12-07). Such a job must answer its expected refusals (a lost
    /// lease, a duplicate) before it changes anything. Should it fail after changing rows (a
    /// broken constraint, a row that does not decode), nothing can take back its part alone:
    /// the whole group commit is rolled back, the job hears its own error and the others that
    /// nothing of the commit was written, as when the COMMIT itself fails.
    async fn run_unguarded<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.job(false, f).await
    }

    async fn job<T, F>(&self, savepoint: bool, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<StoreResult<T>>();
        let job = Job::Run(Box::new(move |conn: &Connection| -> Ran {
            if conn.is_autocommit() {
                return (answer_failed(tx, transaction_ended()), true);
            }
            if savepoint {
                if let Err(e) = exec_cached(conn, "SAVEPOINT job") {
                    return (answer_failed(tx, StoreError::Db(e.to_string())), false);
                }
            }
            let before = conn.total_changes();
            match f(conn) {
                Ok(v) => {
                    if savepoint {
                        let _ = exec_cached(conn, "RELEASE job");
                    }
                    (answer_committed(tx, v), false)
                }
                Err(e) if savepoint => {
                    let _ = exec_cached(conn, "ROLLBACK TO job").and_then(|_| exec_cached(conn, "RELEASE job"));
                    (answer_failed(tx, e), false)
                }
                Err(e) => {
                    let spoiled = conn.total_changes() != before;
                    if spoiled {
                        tracing::error!(error = %e, "a store job failed after changing rows; its group commit is rolled back");
                    }
                    (answer_failed(tx, e), spoiled)
                }
            }
        }));
        self.tx.lock().map_err(|_| StoreError::Closed)?.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// SQLite ends the whole transaction by itself on some errors (an I/O error; a full disk or
/// no memory where the statement has no journal of its own): the jobs after it in the same
/// group commit are refused rather than run outside any transaction.
fn transaction_ended() -> StoreError {
    StoreError::Db("the store's transaction ended early (an earlier job of the same group commit failed); nothing of it was written".into())
}

fn answer_committed<T: Send + 'static>(tx: oneshot::Sender<StoreResult<T>>, v: T) -> Done {
    Box::new(move |committed: Result<(), String>| {
        let _ = tx.send(committed.map(|_| v).map_err(StoreError::Db));
    })
}

fn answer_failed<T: Send + 'static>(tx: oneshot::Sender<StoreResult<T>>, e: StoreError) -> Done {
    Box::new(move |_| {
        let _ = tx.send(Err(e));
    })
}

/// Runs a statement without arguments, prepared once: the transaction statements every job
/// runs would otherwise be parsed again each time.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// SQLite's WAL hook: told the WAL's length in pages after every commit.
extern "C" fn wal_pages(
    counter: *mut std::ffi::c_void,
    _db: *mut rusqlite::ffi::sqlite3,
    _name: *const std::ffi::c_char,
    pages: std::ffi::c_int,
) -> std::ffi::c_int {
    // SAFETY: the context given to `sqlite3_wal_hook` in `open` is an `AtomicI64` that
    // outlives the connection.
    let counter = unsafe { &*(counter as *const AtomicI64) };
    counter.store(pages as i64, Ordering::Relaxed);
    rusqlite::ffi::SQLITE_OK
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).map_err(db)? as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Db(format!(
            "the database is at schema version {current}, newer than this build knows ({}); use a newer patchbay",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction().map_err(db)?;
        tx.execute_batch(sql).map_err(|e| StoreError::Db(format!("migration {}: {e}", i + 1)))?;
        after_migration(&tx, i + 1).map_err(|e| StoreError::Db(format!("migration {}: {e}", i + 1)))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(db)?;
        tx.commit().map_err(db)?;
    }
    Ok(())
}

/// The writer thread: takes every job waiting, runs them in one transaction, commits, then
/// answers each.
///
/// The WAL starts over from its beginning only when a checkpoint has copied *all* of it back
/// and then a write begins. The checkpointer copies what was there when it started, and under
/// steady load the writer has always appended more by the time it ends, so the WAL would grow
/// without bound (hundreds of MB in a minute, every page of it new to the file system). Once
/// the WAL passes `restart_pages`, the writer checkpoints the rest itself between two
/// commits, as soon as the checkpointer is between passes, and its next commit starts the
/// WAL over.
fn writer(conn: Connection, rx: mpsc::Receiver<Job>, wal: Arc<AtomicI64>, restart_pages: i64) {
    let mut batch: Vec<Box<dyn FnOnce(&Connection) -> Ran + Send>> = Vec::with_capacity(MAX_GROUP);
    let mut closing: Option<oneshot::Sender<()>> = None;
    while closing.is_none() {
        match rx.recv() {
            Ok(Job::Run(f)) => batch.push(f),
            Ok(Job::Close(done)) => closing = Some(done),
            Err(_) => break,
        }
        while batch.len() < MAX_GROUP && closing.is_none() {
            match rx.try_recv() {
                Ok(Job::Run(f)) => batch.push(f),
                Ok(Job::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let dones: Vec<Done>;
        let outcome = match exec_cached(&conn, "BEGIN IMMEDIATE") {
            Ok(()) => {
                let mut spoiled = false;
                dones = batch
                    .drain(..)
                    .map(|f| {
                        let (done, spoils) = f(&conn);
                        // A job that failed part-way without a savepoint, or an error after
                        // which SQLite rolled the transaction back itself.
                        spoiled |= spoils || conn.is_autocommit();
                        done
                    })
                    .collect();
                if spoiled {
                    if !conn.is_autocommit() {
                        let _ = conn.execute_batch("ROLLBACK");
                    }
                    Err("a job of the same group commit failed part-way, so none of it was written".to_owned())
                } else {
                    exec_cached(&conn, "COMMIT").map_err(|e| {
                        let _ = conn.execute_batch("ROLLBACK");
                        e.to_string()
                    })
                }
            }
            Err(e) => {
                // Cannot start a transaction (the disk is gone, the file is locked by
                // another process past busy_timeout): every caller hears it.
                let msg = e.to_string();
                dones = batch
                    .drain(..)
                    .map(|_| -> Done { Box::new(|_| {}) })
                    .collect();
                tracing::error!(error = %msg, "cannot begin a store transaction");
                Err(msg)
            }
        };
        for done in dones {
            done(outcome.clone());
        }
        if wal.load(Ordering::Relaxed) >= restart_pages {
            // Tried again after each commit while the checkpointer holds the lock (that
            // attempt costs microseconds).
            let started = std::time::Instant::now();
            match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(2)?))) {
                Ok((0, pages)) => tracing::info!(pages, millis = started.elapsed().as_millis() as u64, "the WAL was checkpointed by the writer and starts over"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "checkpoint failed; the WAL keeps growing until one succeeds"),
            }
        }
    }
    // Shutting down: fold the WAL back into the database so the files on disk are complete.
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    drop(conn);
    drop(wal);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

fn bump_registry(conn: &Connection) -> StoreResult<()> {
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'registry_version'", [])
        .map_err(db)?;
    Ok(())
}

fn paused_json(claim: &Claim) -> String {
    serde_json::to_string(&claim.paused_channels).unwrap_or_else(|_| "[]".into())
}

/// How many of the oldest due rows one claim looks at. Rows queued behind a message in
/// flight are not claimable, and checking each costs an index seek: without a bound, a claim
/// that finds nothing reads the whole backlog. Conversations in flight drain through chained
/// claims meanwhile, so the window moves on.
///
/// The window is a co-routine that yields rows in id order, and the outer query has no
/// ORDER BY of its own on purpose: one would make SQLite collect and sort the whole window
/// (and check every row of it) before taking the first `limit`.
const CLAIM_WINDOW: i64 = 4096;

const CLAIM_INBOX: &str = "
    UPDATE inbox SET lease_owner = ?1, lease_until = ?2, attempts = attempts + 1
    WHERE id IN (
        SELECT a.id FROM (
            SELECT id, conversation_id FROM inbox
            WHERE next_at <= ?3 AND lease_until <= ?3
              AND channel_id NOT IN (SELECT value FROM json_each(?4))
            ORDER BY id LIMIT ?6) a
        WHERE NOT EXISTS (SELECT 1 FROM inbox b WHERE b.conversation_id = a.conversation_id AND b.id < a.id)
        LIMIT ?5)
    RETURNING id, channel_id, event_id, conversation_id, payload, attempts, received_at,
      EXISTS (SELECT 1 FROM outbox o WHERE o.conversation_id = inbox.conversation_id)";

const CLAIM_OUTBOX: &str = "
    UPDATE outbox SET lease_owner = ?1, lease_until = ?2, attempts = attempts + 1
    WHERE id IN (
        SELECT a.id FROM (
            SELECT id, conversation_id FROM outbox
            WHERE next_at <= ?3 AND lease_until <= ?3
              AND channel_id NOT IN (SELECT value FROM json_each(?4))
            ORDER BY id LIMIT ?6) a
        WHERE NOT EXISTS (SELECT 1 FROM outbox b WHERE b.conversation_id = a.conversation_id AND b.id < a.id)
        LIMIT ?5)
    RETURNING id, reply_id, channel_id, payload, attempts, received_at";

const CHAIN_INBOX: &str = "
    UPDATE inbox SET lease_owner = ?1, lease_until = ?2, attempts = attempts + 1
    WHERE id = (SELECT min(id) FROM inbox WHERE conversation_id = ?3)
      AND next_at <= ?4 AND lease_until <= ?4
    RETURNING id, channel_id, event_id, conversation_id, payload, attempts, received_at,
      EXISTS (SELECT 1 FROM outbox o WHERE o.conversation_id = inbox.conversation_id)";

/// Claims a conversation's first queued reply when it is the given one (just queued by the
/// same commit, nothing of the conversation waiting before it).
const CLAIM_OWN_REPLY: &str = "
    UPDATE outbox SET lease_owner = ?1, lease_until = ?2, attempts = attempts + 1
    WHERE id = (SELECT min(id) FROM outbox WHERE conversation_id = ?3)
      AND next_at <= ?4 AND lease_until <= ?4 AND reply_id = ?5
    RETURNING id, reply_id, channel_id, payload, attempts, received_at";

/// Records an event id for dedupe; changes a row only when the event is new (or its entry
/// expired): the statement's change count says whether the event is fresh.
const DEDUPE_SQL: &str = "INSERT INTO dedupe (channel_id, event_id, expires_at) VALUES (?1, ?2, ?3)
     ON CONFLICT (channel_id, event_id) DO UPDATE SET expires_at = excluded.expires_at
     WHERE dedupe.expires_at < ?4";

const INSERT_INBOX_SQL: &str = "INSERT INTO inbox (channel_id, event_id, conversation_id, payload, received_at)
     VALUES (?1, ?2, ?3, ?4, ?5)";

const CHAIN_OUTBOX: &str = "
    UPDATE outbox SET lease_owner = ?1, lease_until = ?2, attempts = attempts + 1
    WHERE id = (SELECT min(id) FROM outbox WHERE conversation_id = ?3)
      AND next_at <= ?4 AND lease_until <= ?4
    RETURNING id, reply_id, channel_id, payload, attempts, received_at";

fn inbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InboxItem> {
    Ok(InboxItem {
        id: r.get(0)?,
        channel_id: r.get(1)?,
        event_id: r.get(2)?,
        conversation_id: r.get(3)?,
        payload: r.get(4)?,
        attempts: r.get(5)?,
        received_at: r.get(6)?,
        replies_queued: r.get(7)?,
    })
}

fn outbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxItem> {
    Ok(OutboxItem {
        id: r.get(0)?,
        reply_id: r.get(1)?,
        channel_id: r.get(2)?,
        payload: r.get(3)?,
        attempts: r.get(4)?,
        received_at: r.get(5)?,
    })
}

fn move_to_dead(conn: &Connection, queue: Queue, id: i64, owner: &str, reason: &str) -> StoreResult<()> {
    let (table, key) = match queue {
        Queue::Inbox => ("inbox", "event_id"),
        Queue::Outbox => ("outbox", "reply_id"),
    };
    let n = conn
        .execute(
            &format!(
                "INSERT INTO dead_letters (queue, channel_id, conversation_id, key, payload, reason, attempts, received_at, failed_at)
                 SELECT ?1, channel_id, conversation_id, {key}, payload, ?2, attempts, received_at, ?3
                 FROM {table} WHERE id = ?4 AND lease_owner = ?5"
            ),
            params![queue.as_str(), reason, patchbay_channel_core::now_ms(), id, owner],
        )
        .map_err(db)?;
    if n == 0 {
        return Err(StoreError::LeaseLost);
    }
    conn.execute(&format!("DELETE FROM {table} WHERE id = ?1"), params![id]).map_err(db)?;
    Ok(())
}

fn release(conn: &Connection, table: &str, id: i64, owner: &str, next_at: i64, error: &str) -> StoreResult<()> {
    let n = conn
        .prepare_cached(&format!(
            "UPDATE {table} SET lease_owner = NULL, lease_until = 0, next_at = ?1, last_error = ?2
             WHERE id = ?3 AND lease_owner = ?4"
        ))
        .and_then(|mut s| s.execute(params![next_at, error, id, owner]))
        .map_err(db)?;
    if n == 0 {
        return Err(StoreError::LeaseLost);
    }
    Ok(())
}

fn insert_outbox(conn: &Connection, replies: &[NewOutbox]) -> StoreResult<usize> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO outbox (reply_id, channel_id, conversation_id, payload, received_at, next_at, lease_owner, lease_until, attempts, last_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(db)?;
    let mut n = 0;
    for r in replies {
        if let Some(reason) = &r.dead_letter {
            insert_dead_letter(conn, Queue::Outbox, &r.channel_id, &r.conversation_id, &r.reply_id, &r.payload, reason, r.attempts, r.received_at)?;
            continue;
        }
        n += stmt
            .execute(params![
                r.reply_id,
                r.channel_id,
                r.conversation_id,
                r.payload,
                r.received_at,
                r.not_before,
                r.held_by.as_ref().map(|h| h.0.as_str()),
                r.held_by.as_ref().map_or(0, |h| h.1),
                r.attempts,
                r.last_error
            ])
            .map_err(db)?;
    }
    Ok(n)
}

/// Inserts a new message claimed by `owner` and answers it, unless its conversation has
/// another message in the inbox (in flight, or waiting): then it is queued behind it,
/// unclaimed.
fn insert_claimed(c: &Connection, it: NewInbox, owner: &str, lease_until: i64) -> StoreResult<Option<InboxItem>> {
    let busy = c
        .prepare_cached("SELECT 1 FROM inbox WHERE conversation_id = ?1 LIMIT 1")
        .and_then(|mut s| s.exists(params![it.conversation_id]))
        .map_err(db)?;
    if busy {
        c.prepare_cached(INSERT_INBOX_SQL)
            .and_then(|mut s| s.execute(params![it.channel_id, it.event_id, it.conversation_id, it.payload, it.received_at]))
            .map_err(db)?;
        return Ok(None);
    }
    c.prepare_cached(
        "INSERT INTO inbox (channel_id, event_id, conversation_id, payload, received_at, lease_owner, lease_until, attempts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1)
         RETURNING id, channel_id, event_id, conversation_id, payload, attempts, received_at,
           EXISTS (SELECT 1 FROM outbox o WHERE o.conversation_id = inbox.conversation_id)",
    )
    .and_then(|mut s| {
        s.query_row(
            params![it.channel_id, it.event_id, it.conversation_id, it.payload, it.received_at, owner, lease_until],
            inbox_row,
        )
    })
    .map(Some)
    .map_err(db)
}

/// Records a message or reply that will not be tried again (unless an admin requeues it).
#[allow(clippy::too_many_arguments)]
fn insert_dead_letter(
    conn: &Connection,
    queue: Queue,
    channel_id: &str,
    conversation_id: &str,
    key: &str,
    payload: &str,
    reason: &str,
    attempts: u32,
    received_at: i64,
) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO dead_letters (queue, channel_id, conversation_id, key, payload, reason, attempts, received_at, failed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .and_then(|mut s| {
        s.execute(params![
            queue.as_str(),
            channel_id,
            conversation_id,
            key,
            payload,
            reason,
            attempts,
            received_at,
            patchbay_channel_core::now_ms()
        ])
    })
    .map(|_| ())
    .map_err(db)
}

/// Appends to a conversation log (see `Store::log_append`).
///
/// Laid out so that an append dirties as few pages as it can (each dirty page is 4 KiB more in
/// the WAL at the commit, and the appends of a thousand conversations share a commit): the
/// entry goes at the end of `log_entries`, beside the other entries of the same commit; the
/// only page of its own is the conversation's leaf of the small (conversation, seq, key_hash)
/// index. The key is looked for in that same leaf.
///
/// Answers the entry's number and whether it is new: an entry whose key is among the
/// conversation's last [`LOG_KEY_WINDOW`] entries is not appended again, and its first number
/// is answered.
fn append_log(c: &Connection, channel: &str, conversation: &str, key: Option<&str>, body: &str, at: i64) -> StoreResult<(i64, bool)> {
    let head: Option<(i64, i64)> = c
        .prepare_cached("SELECT id, last_seq FROM log_conversations WHERE channel_id = ?1 AND conversation = ?2")
        .and_then(|mut s| s.query_row(params![channel, conversation], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(db)?;
    let hash = key.map(key_hash);
    let (conv, seq) = match head {
        Some((conv, last)) => {
            if let (Some(k), Some(h)) = (key, hash) {
                let existing: Option<i64> = c
                    .prepare_cached(
                        "SELECT seq FROM log_entries WHERE conversation = ?1 AND seq > ?2 AND key_hash = ?3 AND key = ?4
                         ORDER BY seq LIMIT 1",
                    )
                    .and_then(|mut s| s.query_row(params![conv, last - LOG_KEY_WINDOW, h, k], |r| r.get(0)).optional())
                    .map_err(db)?;
                if let Some(seq) = existing {
                    return Ok((seq, false));
                }
            }
            c.prepare_cached("UPDATE log_conversations SET last_seq = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![conv, last + 1]))
                .map_err(db)?;
            (conv, last + 1)
        }
        None => {
            let conv: i64 = c
                .prepare_cached("INSERT INTO log_conversations (channel_id, conversation, last_seq) VALUES (?1, ?2, 1) RETURNING id")
                .and_then(|mut s| s.query_row(params![channel, conversation], |r| r.get(0)))
                .map_err(db)?;
            (conv, 1)
        }
    };
    c.prepare_cached("INSERT INTO log_entries (conversation, seq, key_hash, key, body, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        .and_then(|mut s| s.execute(params![conv, seq, hash, key, body, at]))
        .map_err(db)?;
    Ok((seq, true))
}

fn upsert_conversation(conn: &Connection, c: &ConversationRecord) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO conversations (id, channel_id, platform_conversation, thread, route, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET route = excluded.route, updated_at = excluded.updated_at",
    )
    .and_then(|mut s| {
        s.execute(params![c.id, c.channel_id, c.platform_conversation, c.thread, c.route.to_string(), c.updated_at])
    })
    .map_err(db)?;
    Ok(())
}

fn channel_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChannelRecord> {
    Ok(ChannelRecord {
        id: r.get(0)?,
        kind: r.get(1)?,
        assistant: r.get(2)?,
        enabled: r.get(3)?,
        hook_id: r.get(4)?,
        settings: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
        sealed_secrets: r.get(6)?,
        source: Source::parse(&r.get::<_, String>(7)?),
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
    })
}

const CHANNEL_COLUMNS: &str =
    "id, kind, assistant, enabled, hook_id, settings, sealed_secrets, source, created_at, updated_at";

#[async_trait]
impl Store for SqliteStore {
    async fn registry_version(&self) -> StoreResult<i64> {
        self.run(|c| {
            c.query_row("SELECT value FROM meta WHERE key = 'registry_version'", [], |r| r.get(0))
                .map_err(db)
        })
        .await
    }

    async fn load_registry(&self) -> StoreResult<(i64, Vec<AssistantRecord>, Vec<ChannelRecord>)> {
        self.run(|c| {
            let version = c
                .query_row("SELECT value FROM meta WHERE key = 'registry_version'", [], |r| r.get(0))
                .map_err(db)?;
            let mut stmt = c
                .prepare(
                    "SELECT id, backend, settings, sealed_secrets, api_key_hash, source, created_at, updated_at
                     FROM assistants ORDER BY id",
                )
                .map_err(db)?;
            let assistants = stmt
                .query_map([], |r| {
                    Ok(AssistantRecord {
                        id: r.get(0)?,
                        backend: r.get(1)?,
                        settings: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
                        sealed_secrets: r.get(3)?,
                        api_key_hash: r.get(4)?,
                        source: Source::parse(&r.get::<_, String>(5)?),
                        created_at: r.get(6)?,
                        updated_at: r.get(7)?,
                    })
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            let mut stmt = c
                .prepare(&format!("SELECT {CHANNEL_COLUMNS} FROM channels ORDER BY id"))
                .map_err(db)?;
            let channels = stmt
                .query_map([], channel_from_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok((version, assistants, channels))
        })
        .await
    }

    async fn put_assistant(&self, a: AssistantRecord) -> StoreResult<()> {
        self.run(move |c| {
            c.execute(
                "INSERT INTO assistants (id, backend, settings, sealed_secrets, api_key_hash, source, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (id) DO UPDATE SET backend = excluded.backend, settings = excluded.settings,
                   sealed_secrets = excluded.sealed_secrets, api_key_hash = excluded.api_key_hash,
                   source = excluded.source, updated_at = excluded.updated_at",
                params![
                    a.id,
                    a.backend,
                    a.settings.to_string(),
                    a.sealed_secrets,
                    a.api_key_hash,
                    a.source.as_str(),
                    a.created_at,
                    a.updated_at
                ],
            )
            .map_err(db)?;
            bump_registry(c)
        })
        .await
    }

    async fn insert_assistant(&self, a: AssistantRecord) -> StoreResult<()> {
        self.run(move |c| {
            c.execute(
                "INSERT INTO assistants (id, backend, settings, sealed_secrets, api_key_hash, source, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    a.id,
                    a.backend,
                    a.settings.to_string(),
                    a.sealed_secrets,
                    a.api_key_hash,
                    a.source.as_str(),
                    a.created_at,
                    a.updated_at
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    StoreError::Conflict(format!("an assistant `{}` already exists", a.id))
                }
                e => db(e),
            })?;
            bump_registry(c)
        })
        .await
    }

    async fn delete_assistant(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.run(move |c| {
            let users: i64 = c
                .query_row("SELECT count(*) FROM channels WHERE assistant = ?1", params![id], |r| r.get(0))
                .map_err(db)?;
            if users > 0 {
                return Err(StoreError::Conflict(format!(
                    "{users} channel(s) use this assistant; delete them or point them elsewhere first"
                )));
            }
            let n = c.execute("DELETE FROM assistants WHERE id = ?1", params![id]).map_err(db)?;
            bump_registry(c)?;
            Ok(n > 0)
        })
        .await
    }

    async fn put_channel(&self, ch: ChannelRecord, mode: Upsert) -> StoreResult<ChannelRecord> {
        self.run(move |c| {
            // Every statement is bound to the same ten parameters (numbered, so a statement may
            // leave some unused); each mode writes only its own columns.
            let sql = match mode {
                Upsert::Insert => {
                    "INSERT INTO channels (id, kind, assistant, enabled, hook_id, settings, sealed_secrets, source, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                }
                Upsert::Edit => {
                    "UPDATE channels SET kind = ?2, assistant = ?3, settings = ?6, sealed_secrets = ?7, source = ?8,
                       updated_at = ?10
                     WHERE id = ?1"
                }
                Upsert::RotateHook => {
                    "UPDATE channels SET hook_id = ?5, updated_at = ?10
                     WHERE id = ?1"
                }
                Upsert::KeepStateFromStore => {
                    "INSERT INTO channels (id, kind, assistant, enabled, hook_id, settings, sealed_secrets, source, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, assistant = excluded.assistant,
                       settings = excluded.settings, sealed_secrets = excluded.sealed_secrets,
                       source = excluded.source,
                       updated_at = CASE WHEN channels.kind = excluded.kind AND channels.assistant = excluded.assistant
                         AND channels.settings = excluded.settings AND channels.sealed_secrets IS excluded.sealed_secrets
                         THEN channels.updated_at ELSE excluded.updated_at END"
                }
            };
            let n = c
                .execute(
                    sql,
                    params![
                        ch.id,
                        ch.kind,
                        ch.assistant,
                        ch.enabled,
                        ch.hook_id,
                        ch.settings.to_string(),
                        ch.sealed_secrets,
                        ch.source.as_str(),
                        ch.created_at,
                        ch.updated_at
                    ],
                )
                .map_err(|e| match e {
                    rusqlite::Error::SqliteFailure(f, m) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                        if m.as_deref().is_some_and(|m| m.contains("channels.id")) {
                            StoreError::Conflict(format!("a channel `{}` already exists", ch.id))
                        } else {
                            StoreError::Conflict("another channel already uses this hook_id".into())
                        }
                    }
                    e => db(e),
                })?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("channel `{}` was deleted meanwhile", ch.id)));
            }
            bump_registry(c)?;
            c.query_row(
                &format!("SELECT {CHANNEL_COLUMNS} FROM channels WHERE id = ?1"),
                params![ch.id],
                channel_from_row,
            )
            .map_err(db)
        })
        .await
    }

    async fn set_channel_enabled(&self, id: &str, enabled: bool) -> StoreResult<bool> {
        let id = id.to_owned();
        self.run(move |c| {
            let n = c
                .execute(
                    "UPDATE channels SET enabled = ?1, updated_at = ?2 WHERE id = ?3",
                    params![enabled, patchbay_channel_core::now_ms(), id],
                )
                .map_err(db)?;
            bump_registry(c)?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_channel(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.run(move |c| {
            let n = c.execute("DELETE FROM channels WHERE id = ?1", params![id]).map_err(db)?;
            c.execute("DELETE FROM channel_kv WHERE channel_id = ?1", params![id]).map_err(db)?;
            bump_registry(c)?;
            Ok(n > 0)
        })
        .await
    }

    async fn inbox_put(&self, items: Vec<NewInbox>, dedupe_until: i64, claim: Option<PutClaim>) -> StoreResult<(Vec<Accepted>, Vec<InboxItem>, Vec<Option<i64>>)> {
        self.run_unguarded(move |c| {
            let mut seen = c.prepare_cached(DEDUPE_SQL).map_err(db)?;
            let now = patchbay_channel_core::now_ms();
            let mut out = Vec::with_capacity(items.len());
            let mut logged = Vec::with_capacity(items.len());
            let mut claimed = Vec::new();
            for it in items {
                // A message with a log entry is deduped by its conversation's log, where the
                // entry is keyed by the event id: a row in `dedupe` as well would dirty one
                // more random page per message (docs/architecture.md, "Conversation logs").
                let (fresh, seq) = match &it.log {
                    Some((conversation, body)) => {
                        let (seq, fresh) = append_log(c, &it.channel_id, conversation, Some(&it.event_id), body, now)?;
                        (fresh, Some(seq))
                    }
                    None => (seen.execute(params![it.channel_id, it.event_id, dedupe_until, now]).map_err(db)? > 0, None),
                };
                if !fresh {
                    out.push(Accepted::Duplicate);
                    logged.push(None);
                    continue;
                }
                out.push(Accepted::New);
                logged.push(seq);
                match &claim {
                    Some(cl) if claimed.len() < cl.limit => {
                        if let Some(item) = insert_claimed(c, it, &cl.owner, cl.lease_until)? {
                            claimed.push(item);
                        }
                    }
                    _ => {
                        c.prepare_cached(INSERT_INBOX_SQL)
                            .and_then(|mut s| s.execute(params![it.channel_id, it.event_id, it.conversation_id, it.payload, it.received_at]))
                            .map_err(db)?;
                    }
                }
            }
            Ok((out, claimed, logged))
        })
        .await
    }

    async fn dead_letter_put(&self, it: NewInbox, attempts: u32, reason: String) -> StoreResult<()> {
        self.run(move |c| {
            insert_dead_letter(c, Queue::Inbox, &it.channel_id, &it.conversation_id, &it.event_id, &it.payload, &reason, attempts, it.received_at)
        })
        .await
    }

    async fn inbox_claim(&self, claim: Claim) -> StoreResult<Vec<InboxItem>> {
        self.run_unguarded(move |c| {
            let mut stmt = c.prepare_cached(CLAIM_INBOX).map_err(db)?;
            let rows = stmt
                .query_map(
                    params![claim.owner, claim.lease_until, claim.now, paused_json(&claim), claim.limit as i64, CLAIM_WINDOW],
                    inbox_row,
                )
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn inbox_complete(
        &self,
        id: i64,
        owner: &str,
        replies: Vec<NewOutbox>,
        logs: Vec<NewLogEntry>,
        conversation_id: String,
        remember: Option<ConversationRecord>,
        next: Option<ChainClaim>,
        send: Option<(String, ChainClaim)>,
    ) -> StoreResult<Completed> {
        let owner = owner.to_owned();
        self.run_unguarded(move |c| {
            let n = c
                .prepare_cached("DELETE FROM inbox WHERE id = ?1 AND lease_owner = ?2")
                .and_then(|mut s| s.execute(params![id, owner]))
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::LeaseLost);
            }
            insert_outbox(c, &replies)?;
            let logged = logs
                .iter()
                .map(|l| append_log(c, &l.channel_id, &l.conversation, Some(&l.key), &l.body, l.at).map(|(seq, _)| seq))
                .collect::<StoreResult<Vec<i64>>>()?;
            if let Some(conversation) = &remember {
                upsert_conversation(c, conversation)?;
            }
            let sending = match (&send, replies.iter().find(|r| r.dead_letter.is_none())) {
                (Some((send_owner, claim)), Some(first)) => c
                    .prepare_cached(CLAIM_OWN_REPLY)
                    .and_then(|mut s| {
                        s.query_row(params![send_owner, claim.lease_until, conversation_id, claim.now, first.reply_id], outbox_row)
                            .optional()
                    })
                    .map_err(db)?,
                _ => None,
            };
            let next = match next {
                None => None,
                Some(next) => c
                    .prepare_cached(CHAIN_INBOX)
                    .and_then(|mut s| {
                        s.query_row(params![owner, next.lease_until, conversation_id, next.now], inbox_row)
                            .optional()
                    })
                    .map_err(db)?,
            };
            Ok(Completed { next, sending, logged })
        })
        .await
    }

    async fn inbox_release(&self, id: i64, owner: &str, next_at: i64, error: &str) -> StoreResult<()> {
        let (owner, error) = (owner.to_owned(), error.to_owned());
        self.run(move |c| release(c, "inbox", id, &owner, next_at, &error)).await
    }

    async fn inbox_dead(&self, id: i64, owner: &str, reason: &str) -> StoreResult<()> {
        let (owner, reason) = (owner.to_owned(), reason.to_owned());
        self.run(move |c| move_to_dead(c, Queue::Inbox, id, &owner, &reason)).await
    }

    async fn outbox_put(&self, replies: Vec<NewOutbox>) -> StoreResult<usize> {
        self.run(move |c| insert_outbox(c, &replies)).await
    }

    async fn outbox_claim(&self, claim: Claim) -> StoreResult<Vec<OutboxItem>> {
        self.run_unguarded(move |c| {
            let mut stmt = c.prepare_cached(CLAIM_OUTBOX).map_err(db)?;
            let rows = stmt
                .query_map(
                    params![claim.owner, claim.lease_until, claim.now, paused_json(&claim), claim.limit as i64, CLAIM_WINDOW],
                    outbox_row,
                )
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn outbox_done(&self, id: i64, owner: &str, next: Option<ChainClaim>) -> StoreResult<Option<OutboxItem>> {
        let owner = owner.to_owned();
        self.run_unguarded(move |c| {
            let conversation: Option<String> = c
                .prepare_cached("DELETE FROM outbox WHERE id = ?1 AND lease_owner = ?2 RETURNING conversation_id")
                .and_then(|mut s| s.query_row(params![id, owner], |r| r.get(0)).optional())
                .map_err(db)?;
            let Some(conversation) = conversation else {
                return Err(StoreError::LeaseLost);
            };
            let Some(next) = next else { return Ok(None) };
            c.prepare_cached(CHAIN_OUTBOX)
                .and_then(|mut s| {
                    s.query_row(params![owner, next.lease_until, conversation, next.now], outbox_row)
                        .optional()
                })
                .map_err(db)
        })
        .await
    }

    async fn outbox_unhold(&self, owner: String, deliver: bool) -> StoreResult<()> {
        self.run_unguarded(move |c| {
            let sql = if deliver {
                "UPDATE outbox SET lease_owner = NULL, lease_until = 0 WHERE lease_owner = ?1"
            } else {
                "DELETE FROM outbox WHERE lease_owner = ?1"
            };
            c.prepare_cached(sql).and_then(|mut s| s.execute(params![owner])).map(|_| ()).map_err(db)
        })
        .await
    }

    async fn outbox_release(&self, id: i64, owner: &str, next_at: i64, error: &str) -> StoreResult<()> {
        let (owner, error) = (owner.to_owned(), error.to_owned());
        self.run(move |c| release(c, "outbox", id, &owner, next_at, &error)).await
    }

    async fn outbox_dead(&self, id: i64, owner: &str, reason: &str) -> StoreResult<()> {
        let (owner, reason) = (owner.to_owned(), reason.to_owned());
        self.run(move |c| move_to_dead(c, Queue::Outbox, id, &owner, &reason)).await
    }

    async fn conversation(&self, id: &str) -> StoreResult<Option<ConversationRecord>> {
        let id = id.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT id, channel_id, platform_conversation, thread, route, updated_at FROM conversations WHERE id = ?1",
                params![id],
                |r| {
                    Ok(ConversationRecord {
                        id: r.get(0)?,
                        channel_id: r.get(1)?,
                        platform_conversation: r.get(2)?,
                        thread: r.get(3)?,
                        route: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
                        updated_at: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn dead_letters(&self, channel: Option<String>, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        self.run(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT id, queue, channel_id, conversation_id, reason, attempts, failed_at, payload
                     FROM dead_letters WHERE (?1 IS NULL OR channel_id = ?1) ORDER BY id DESC LIMIT ?2",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![channel, limit as i64], |r| {
                    Ok(DeadLetter {
                        id: r.get(0)?,
                        queue: if r.get::<_, String>(1)? == "inbox" { Queue::Inbox } else { Queue::Outbox },
                        channel_id: r.get(2)?,
                        conversation_id: r.get(3)?,
                        reason: r.get(4)?,
                        attempts: r.get(5)?,
                        failed_at: r.get(6)?,
                        payload: r.get(7)?,
                    })
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn dead_letter_retry(&self, id: i64) -> StoreResult<bool> {
        self.run(move |c| {
            let queue: Option<String> = c
                .query_row("SELECT queue FROM dead_letters WHERE id = ?1", params![id], |r| r.get(0))
                .optional()
                .map_err(db)?;
            let Some(queue) = queue else { return Ok(false) };
            let sql = if queue == "inbox" {
                "INSERT INTO inbox (channel_id, event_id, conversation_id, payload, received_at)
                 SELECT channel_id, key, conversation_id, payload, received_at FROM dead_letters WHERE id = ?1"
            } else {
                "INSERT OR IGNORE INTO outbox (reply_id, channel_id, conversation_id, payload, received_at)
                 SELECT key, channel_id, conversation_id, payload, received_at FROM dead_letters WHERE id = ?1"
            };
            c.execute(sql, params![id]).map_err(db)?;
            c.execute("DELETE FROM dead_letters WHERE id = ?1", params![id]).map_err(db)?;
            Ok(true)
        })
        .await
    }

    async fn dead_letter_delete(&self, id: i64) -> StoreResult<bool> {
        self.run(move |c| {
            Ok(c.execute("DELETE FROM dead_letters WHERE id = ?1", params![id]).map_err(db)? > 0)
        })
        .await
    }

    async fn log_append(&self, channel: &str, conversation: &str, key: Option<String>, body: String, at: i64) -> StoreResult<i64> {
        let (channel, conversation) = (channel.to_owned(), conversation.to_owned());
        self.run_unguarded(move |c| append_log(c, &channel, &conversation, key.as_deref(), &body, at).map(|(seq, _)| seq)).await
    }

    async fn log_read(&self, channel: &str, conversation: &str, range: LogRange, limit: usize) -> StoreResult<Vec<LogEntry>> {
        let (channel, conversation) = (channel.to_owned(), conversation.to_owned());
        self.run(move |c| {
            let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<LogEntry> {
                Ok(LogEntry {
                    seq: r.get(0)?,
                    at: r.get(1)?,
                    body: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
                })
            };
            let conv: Option<i64> = c
                .prepare_cached("SELECT id FROM log_conversations WHERE channel_id = ?1 AND conversation = ?2")
                .and_then(|mut s| s.query_row(params![channel, conversation], |r| r.get(0)).optional())
                .map_err(db)?;
            let Some(conv) = conv else { return Ok(Vec::new()) };
            let mut rows = match range {
                LogRange::After(after) => c
                    .prepare_cached(
                        "SELECT seq, at, body FROM log_entries WHERE conversation = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                    )
                    .and_then(|mut s| s.query_map(params![conv, after, limit as i64], row)?.collect())
                    .map_err(db)?,
                LogRange::Before(before) => c
                    .prepare_cached(
                        "SELECT seq, at, body FROM log_entries WHERE conversation = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![conv, before.unwrap_or(i64::MAX), limit as i64], row)?
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .map(|mut v: Vec<LogEntry>| {
                        v.reverse();
                        v
                    })
                    .map_err(db)?,
            };
            rows.truncate(limit);
            Ok(rows)
        })
        .await
    }

    async fn log_prune(&self, channel: &str, before: i64) -> StoreResult<u64> {
        // In jobs of at most LOG_PRUNE_CHUNK rows: a first prune of a large log must not hold
        // the writer (and every acknowledgement behind it) for seconds.
        let mut total = 0;
        loop {
            let channel = channel.to_owned();
            let n = self
                .run(move |c| {
                    c.prepare_cached(
                        "DELETE FROM log_entries WHERE id IN (
                           SELECT e.id FROM log_entries e WHERE e.at < ?2
                             AND e.conversation IN (SELECT id FROM log_conversations WHERE channel_id = ?1)
                           LIMIT ?3)",
                    )
                    .and_then(|mut s| s.execute(params![channel, before, LOG_PRUNE_CHUNK]))
                    .map_err(db)
                })
                .await? as u64;
            total += n;
            if n < LOG_PRUNE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }

    async fn kv_get(&self, channel: &str, key: &str, now: i64) -> StoreResult<Option<Vec<u8>>> {
        let (channel, key) = (channel.to_owned(), key.to_owned());
        self.run(move |c| {
            c.prepare_cached("SELECT value FROM channel_kv WHERE channel_id = ?1 AND key = ?2 AND (expires_at IS NULL OR expires_at > ?3)")
                .and_then(|mut s| s.query_row(params![channel, key, now], |r| r.get(0)).optional())
                .map_err(db)
        })
        .await
    }

    async fn kv_put(&self, channel: &str, key: &str, sealed: Vec<u8>, expires_at: Option<i64>) -> StoreResult<()> {
        let (channel, key) = (channel.to_owned(), key.to_owned());
        self.run(move |c| {
            c.prepare_cached(
                "INSERT INTO channel_kv (channel_id, key, value, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (channel_id, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            )
            .and_then(|mut s| s.execute(params![channel, key, sealed, expires_at]))
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn kv_delete(&self, channel: &str, key: &str, now: i64) -> StoreResult<bool> {
        let (channel, key) = (channel.to_owned(), key.to_owned());
        self.run(move |c| {
            let live: Option<i64> = c
                .prepare_cached("DELETE FROM channel_kv WHERE channel_id = ?1 AND key = ?2 RETURNING coalesce(expires_at, ?3 + 1)")
                .and_then(|mut s| s.query_row(params![channel, key, now], |r| r.get(0)).optional())
                .map_err(db)?;
            Ok(live.is_some_and(|e| e > now))
        })
        .await
    }

    async fn kv_keys(&self, channel: &str, prefix: &str, now: i64) -> StoreResult<Vec<String>> {
        let channel = channel.to_owned();
        let pattern = format!("{}%", prefix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
        self.run(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT key FROM channel_kv WHERE channel_id = ?1 AND key LIKE ?2 ESCAPE '\\'
                     AND (expires_at IS NULL OR expires_at > ?3) ORDER BY key",
                )
                .map_err(db)?;
            let rows = s.query_map(params![channel, pattern, now], |r| r.get::<_, String>(0)).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn prune(&self, now: i64) -> StoreResult<u64> {
        self.run(move |c| {
            let n = c.execute("DELETE FROM dedupe WHERE expires_at < ?1", params![now]).map_err(db)?;
            let k = c.execute("DELETE FROM channel_kv WHERE expires_at < ?1", params![now]).map_err(db)?;
            Ok((n + k) as u64)
        })
        .await
    }

    async fn depths(&self) -> StoreResult<QueueDepths> {
        self.run(|c| {
            let count = |table: &str| -> StoreResult<u64> {
                c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0))
                    .map(|n| n as u64)
                    .map_err(db)
            };
            Ok(QueueDepths {
                inbox: count("inbox")?,
                outbox: count("outbox")?,
                dead_letters: count("dead_letters")?,
            })
        })
        .await
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        let sent = self.tx.lock().map(|s| s.send(Job::Close(tx)).is_ok()).unwrap_or(false);
        if sent {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose writer starts only when told, so that the jobs queued before form one
    /// group commit.
    fn store_with_held_writer(path: &Path) -> (SqliteStore, impl FnOnce()) {
        let mut conn = Connection::open(path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000;").unwrap();
        migrate(&mut conn).unwrap();
        let (tx, rx) = mpsc::channel::<Job>();
        let start = move || {
            std::thread::spawn(move || writer(conn, rx, Arc::new(AtomicI64::new(0)), WAL_RESTART_PAGES));
        };
        (SqliteStore { tx: Mutex::new(tx) }, start)
    }

    /// Polls a store call once, which queues its job.
    fn queue<F: std::future::Future + Unpin>(f: &mut F) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::pin::Pin::new(f).poll(&mut cx).is_pending(), "the writer has not started");
    }

    fn put_kv(key: &'static str) -> impl FnOnce(&Connection) -> StoreResult<()> + Send + 'static {
        move |c: &Connection| {
            c.execute("INSERT INTO channel_kv (channel_id, key, value) VALUES ('t', ?1, x'00')", [key]).map(|_| ()).map_err(db)
        }
    }

    #[tokio::test]
    async fn a_job_without_savepoint_that_fails_part_way_takes_its_whole_group_commit_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");

        // One group: a job refusing before it changed anything does not disturb the others.
        let (store, start) = store_with_held_writer(&path);
        let mut a = Box::pin(store.run_unguarded(put_kv("a")));
        let mut refused = Box::pin(store.run_unguarded(|_| Err::<(), _>(StoreError::LeaseLost)));
        let mut b = Box::pin(store.run_unguarded(put_kv("b")));
        queue(&mut a);
        queue(&mut refused);
        queue(&mut b);
        start();
        a.await.unwrap();
        assert!(matches!(refused.await, Err(StoreError::LeaseLost)));
        b.await.unwrap();

        // Another group: one job fails after it inserted a row. Nothing of the group is
        // written, and every job in it is told, guarded or not.
        let (store, start) = store_with_held_writer(&path);
        let mut c = Box::pin(store.run_unguarded(put_kv("c")));
        let mut spoiler = Box::pin(store.run_unguarded(|conn: &Connection| {
            put_kv("d")(conn)?;
            Err::<(), _>(StoreError::Db("the disk is full".into()))
        }));
        let mut e = Box::pin(store.run(put_kv("e")));
        queue(&mut c);
        queue(&mut spoiler);
        queue(&mut e);
        start();
        let told = |r: StoreResult<()>| match r {
            Err(StoreError::Db(m)) => m,
            other => panic!("expected a store error, got {other:?}"),
        };
        assert!(told(c.await).contains("failed part-way"));
        assert_eq!(told(spoiler.await), "the disk is full", "the failing job hears its own error");
        assert!(told(e.await).contains("failed part-way"));

        let store = SqliteStore::open(&path, SqliteSynchronous::Normal).unwrap();
        assert_eq!(store.kv_keys("t", "", 0).await.unwrap(), vec!["a", "b"]);

        // The store's own jobs refuse before they change anything: a completion whose lease
        // was lost and a delivery of a reply that is gone share a group commit with a new
        // message, which is stored all the same.
        let message = |event: &str| NewInbox {
            channel_id: "c".into(),
            event_id: event.into(),
            conversation_id: format!("c:{event}"),
            payload: "{}".into(),
            received_at: 0,
            log: None,
        };
        let claim = PutClaim { owner: "me".into(), lease_until: i64::MAX, limit: 1 };
        let (_, claimed, _) = store.inbox_put(vec![message("m1")], i64::MAX, Some(claim)).await.unwrap();
        let m1 = claimed[0].id;
        let (held, start) = store_with_held_writer(&path);
        let mut complete = Box::pin(held.inbox_complete(m1, "someone else", Vec::new(), Vec::new(), "c:m1".into(), None, None, None));
        let mut done = Box::pin(held.outbox_done(4242, "me", None));
        let mut put = Box::pin(held.inbox_put(vec![message("m2")], i64::MAX, None));
        queue(&mut complete);
        queue(&mut done);
        queue(&mut put);
        start();
        assert!(matches!(complete.await, Err(StoreError::LeaseLost)));
        assert!(matches!(done.await, Err(StoreError::LeaseLost)));
        assert_eq!(put.await.unwrap().0, vec![Accepted::New]);
        let (again, _, _) = store.inbox_put(vec![message("m1"), message("m2")], i64::MAX, None).await.unwrap();
        assert_eq!(again, vec![Accepted::Duplicate, Accepted::Duplicate], "both stored");
        store.inbox_complete(m1, "me", Vec::new(), Vec::new(), "c:m1".into(), None, None, None).await.unwrap();
    }

    #[tokio::test]
    async fn channel_kv_expires_takes_once_lists_by_prefix_and_goes_with_the_channel() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), SqliteSynchronous::Normal).unwrap();
        store.kv_put("s", "team:T1", b"sealed-1".to_vec(), None).await.unwrap();
        store.kv_put("s", "team:T1", b"sealed-2".to_vec(), None).await.unwrap();
        store.kv_put("s", "state:a", b"x".to_vec(), Some(100)).await.unwrap();
        store.kv_put("s", "state_b", b"x".to_vec(), None).await.unwrap();
        store.kv_put("other", "team:T1", b"y".to_vec(), None).await.unwrap();
        assert_eq!(store.kv_get("s", "team:T1", 50).await.unwrap(), Some(b"sealed-2".to_vec()), "replaced");
        assert_eq!(store.kv_get("s", "state:a", 50).await.unwrap(), Some(b"x".to_vec()));
        assert_eq!(store.kv_get("s", "state:a", 100).await.unwrap(), None, "expired");
        assert_eq!(store.kv_keys("s", "state:", 50).await.unwrap(), vec!["state:a"], "`_` is not a wildcard");
        assert!(store.kv_delete("s", "state:a", 50).await.unwrap());
        assert!(!store.kv_delete("s", "state:a", 50).await.unwrap(), "taken once");
        store.kv_put("s", "state:c", b"x".to_vec(), Some(10)).await.unwrap();
        assert!(!store.kv_delete("s", "state:c", 50).await.unwrap(), "an expired value cannot be taken");
        store.delete_channel("s").await.unwrap();
        assert_eq!(store.kv_get("s", "team:T1", 50).await.unwrap(), None, "gone with the channel");
        assert_eq!(store.kv_get("other", "team:T1", 50).await.unwrap(), Some(b"y".to_vec()));
    }

    #[tokio::test]
    async fn conversation_log_numbers_dedupes_pages_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, SqliteSynchronous::Normal).unwrap();
        for i in 1..=5i64 {
            let seq = store.log_append("web", "u1", Some(format!("r{i}")), format!("{{\"n\":{i}}}"), i).await.unwrap();
            assert_eq!(seq, i);
        }
        // A retried delivery of the same key is logged once, with its first number.
        assert_eq!(store.log_append("web", "u1", Some("r2".into()), "{}".into(), 9).await.unwrap(), 2);
        // Conversations and channels count separately.
        assert_eq!(store.log_append("web", "u2", None, "{}".into(), 1).await.unwrap(), 1);
        assert_eq!(store.log_append("web2", "u1", None, "{}".into(), 1).await.unwrap(), 1);
        let seqs = |v: Vec<LogEntry>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(store.log_read("web", "u1", LogRange::After(3), 10).await.unwrap()), vec![4, 5]);
        assert_eq!(seqs(store.log_read("web", "u1", LogRange::After(0), 2).await.unwrap()), vec![1, 2]);
        assert_eq!(seqs(store.log_read("web", "u1", LogRange::Before(None), 2).await.unwrap()), vec![4, 5]);
        assert_eq!(seqs(store.log_read("web", "u1", LogRange::Before(Some(4)), 2).await.unwrap()), vec![2, 3]);
        let first = store.log_read("web", "u1", LogRange::After(0), 1).await.unwrap();
        assert_eq!(first[0].body, serde_json::json!({"n": 1}));
        // Retention: the channel's entries before t=3 go (u1's first two, u2's only one);
        // another channel's stay; numbers continue, never reused.
        assert_eq!(store.log_prune("web", 3).await.unwrap(), 3);
        assert_eq!(seqs(store.log_read("web", "u1", LogRange::After(0), 10).await.unwrap()), vec![3, 4, 5]);
        assert_eq!(store.log_prune("web", i64::MAX).await.unwrap(), 3);
        assert_eq!(store.log_read("web2", "u1", LogRange::After(0), 10).await.unwrap().len(), 1);
        assert_eq!(store.log_append("web", "u1", None, "{}".into(), 10).await.unwrap(), 6);
        store.close().await;
        // The log survives a restart, and migration 2 is not applied twice.
        let store = SqliteStore::open(&path, SqliteSynchronous::Normal).unwrap();
        assert_eq!(store.log_append("web", "u1", None, "{}".into(), 11).await.unwrap(), 7);
        store.close().await;
    }

    #[tokio::test]
    async fn a_log_key_is_recognised_within_its_window_and_prunes_run_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), SqliteSynchronous::Normal).unwrap();
        assert_eq!(store.log_append("web", "u1", Some("first".into()), "{}".into(), 1).await.unwrap(), 1);
        for i in 0..LOG_KEY_WINDOW - 1 {
            store.log_append("web", "u1", Some(format!("k{i}")), "{}".into(), 1).await.unwrap();
        }
        // `first` is the oldest entry still in the window: recognised.
        assert_eq!(store.log_append("web", "u1", Some("first".into()), "{}".into(), 2).await.unwrap(), 1);
        store.log_append("web", "u1", None, "{}".into(), 2).await.unwrap();
        // One entry later it is out of the window: a key that old is a new entry.
        assert_eq!(store.log_append("web", "u1", Some("first".into()), "{}".into(), 2).await.unwrap(), LOG_KEY_WINDOW + 2);
        // A prune larger than one chunk removes everything it should, in several jobs.
        let many = LOG_PRUNE_CHUNK as usize + 10;
        for i in 0..many {
            store.log_append("web", &format!("c{}", i % 7), None, "{}".into(), 5).await.unwrap();
        }
        store.log_append("other", "c1", None, "{}".into(), 5).await.unwrap();
        assert_eq!(store.log_prune("web", 6).await.unwrap(), (many + LOG_KEY_WINDOW as usize + 2) as u64);
        assert_eq!(store.log_read("other", "c1", LogRange::After(0), 10).await.unwrap().len(), 1, "another channel's entries stay");
        assert_eq!(store.log_append("web", "c3", None, "{}".into(), 7).await.unwrap(), (0..many).filter(|i| i % 7 == 3).count() as i64 + 1, "numbers go on");
        store.close().await;
    }

    /// A message stored with its log entry (web chat) is deduped by the log, not the dedupe
    /// table: a repeat within the conversation's window is a duplicate with no new entry and
    /// no second inbox row, and the `dedupe` table is never written.
    #[tokio::test]
    async fn a_message_with_a_log_entry_is_deduped_by_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), SqliteSynchronous::Normal).unwrap();
        let item = |event: &str, conversation: &str| NewInbox {
            channel_id: "web".into(),
            event_id: event.into(),
            conversation_id: format!("web:{conversation}"),
            payload: "{}".into(),
            received_at: 0,
            log: Some((conversation.into(), format!(r#"{{"id":"{event}"}}"#))),
        };
        let (accepted, _, logged) = store.inbox_put(vec![item("u1:m1", "u1"), item("u2:m1", "u2")], i64::MAX, None).await.unwrap();
        assert_eq!(accepted, vec![Accepted::New, Accepted::New]);
        assert_eq!(logged, vec![Some(1), Some(1)]);
        // The same message again (a client retrying after a dropped socket), in a commit with
        // a new one: only the new one is stored and logged.
        let (accepted, _, logged) = store.inbox_put(vec![item("u1:m1", "u1"), item("u1:m2", "u1")], i64::MAX, None).await.unwrap();
        assert_eq!(accepted, vec![Accepted::Duplicate, Accepted::New]);
        assert_eq!(logged, vec![None, Some(2)]);
        let entries = store.log_read("web", "u1", LogRange::After(0), 10).await.unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2], "the repeat added no entry");
        assert_eq!(store.depths().await.unwrap().inbox, 3, "three messages queued, the repeat not among them");
        let dedupe_rows: i64 = store.run(|c| c.query_row("SELECT count(*) FROM dedupe", [], |r| r.get(0)).map_err(db)).await.unwrap();
        assert_eq!(dedupe_rows, 0);
        // A message without a log entry still goes through the dedupe table.
        let plain = NewInbox { log: None, ..item("u3:m1", "u3") };
        let (accepted, _, _) = store.inbox_put(vec![plain.clone(), plain], i64::MAX, None).await.unwrap();
        assert_eq!(accepted, vec![Accepted::New, Accepted::Duplicate]);
        store.close().await;
    }

    /// A database written by a build with migration 2's log (schema 3) keeps its history,
    /// numbers and keys when migration 4 lays the log out again.
    #[tokio::test]
    async fn migration_4_keeps_the_logs_of_schema_3() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..3] {
                conn.execute_batch(sql).unwrap();
            }
            conn.execute_batch(
                r#"PRAGMA user_version = 3;
                INSERT INTO conversation_log_heads VALUES ('web', 'u1', 9), ('web', 'u2', 1);
                INSERT INTO conversation_log VALUES
                  ('web', 'u1', 7, 'r7', '{"n":7}', 70), ('web', 'u1', 8, NULL, '{"n":8}', 80),
                  ('web', 'u1', 9, 'r9', '{"n":9}', 90), ('web', 'u2', 1, 'x', '{"n":1}', 75);"#,
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path, SqliteSynchronous::Normal).unwrap();
        let u1 = store.log_read("web", "u1", LogRange::After(0), 10).await.unwrap();
        assert_eq!(u1.iter().map(|e| (e.seq, e.at)).collect::<Vec<_>>(), vec![(7, 70), (8, 80), (9, 90)]);
        assert_eq!(u1[2].body, serde_json::json!({"n": 9}));
        assert_eq!(store.log_append("web", "u1", Some("r7".into()), "{}".into(), 100).await.unwrap(), 7, "keys carried over");
        assert_eq!(store.log_append("web", "u1", None, "{}".into(), 100).await.unwrap(), 10, "numbering carried over");
        assert_eq!(store.log_append("web", "u2", Some("x".into()), "{}".into(), 100).await.unwrap(), 1);
        assert_eq!(store.log_read("web", "u2", LogRange::Before(None), 10).await.unwrap().len(), 1);
        store.close().await;
    }

    /// Under writes that never pause, the checkpointer alone never catches up with the WAL
    /// (each pass ends after more was appended), so it would grow by the full size of
    /// everything written. The writer finishing the checkpoint is what lets it start over;
    /// here it is the only one checkpointing, so the bound is exact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_writes_that_never_pause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let restart_pages: u64 = 2048;
        let store = Arc::new(SqliteStore::open_with(&path, SqliteSynchronous::Normal, restart_pages as i64, false).unwrap());
        let payload = "x".repeat(8 * 1024);
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (store, payload) = (store.clone(), payload.clone());
                tokio::spawn(async move {
                    for i in 0..5000 {
                        let item = NewInbox {
                            channel_id: "c".into(),
                            event_id: format!("e{w}-{i}"),
                            conversation_id: format!("conv{w}-{i}"),
                            payload: payload.clone(),
                            received_at: 0,
                            log: None,
                        };
                        store.inbox_put(vec![item], i64::MAX, None).await.unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        // 20,000 rows of 8 KiB: about 170 MB went through the WAL; it passes the restart
        // point by at most one group commit (up to MAX_GROUP rows).
        let wal = std::fs::metadata(dir.path().join("t.db-wal")).unwrap().len();
        assert!(
            wal < (restart_pages + 3 * MAX_GROUP as u64) * 4096,
            "the WAL grew to {} MB; it should start over after about {} MB",
            wal / 1_000_000,
            restart_pages * 4096 / 1_000_000
        );
        store.close().await;
    }

    /// While busy the WAL file keeps its largest size (cutting it under load stalled the
    /// writer); once the store is idle, a large one is cut back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_wal_is_cut_back_once_the_store_is_idle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let wal_file = dir.path().join("t.db-wal");
        let store = Arc::new(SqliteStore::open(&path, SqliteSynchronous::Normal).unwrap());
        let payload = "x".repeat(8 * 1024);
        let wal_len = || std::fs::metadata(&wal_file).map(|m| m.len()).unwrap_or(0);
        // Writes that never pause, until the WAL is past the limit (bounded: 320 MB at most).
        let mut rounds = 0;
        while wal_len() <= WAL_SIZE_LIMIT && rounds < 40 {
            let writers: Vec<_> = (0..4)
                .map(|w| {
                    let (store, payload) = (store.clone(), payload.clone());
                    tokio::spawn(async move {
                        for i in 0..250 {
                            let item = NewInbox {
                                channel_id: "c".into(),
                                event_id: format!("e{rounds}-{w}-{i}"),
                                conversation_id: format!("conv{w}-{i}"),
                                payload: payload.clone(),
                                received_at: 0,
                                log: None,
                            };
                            store.inbox_put(vec![item], i64::MAX, None).await.unwrap();
                        }
                    })
                })
                .collect();
            for w in writers {
                w.await.unwrap();
            }
            rounds += 1;
        }
        assert!(wal_len() > WAL_SIZE_LIMIT, "the WAL never grew past {} MB under load", WAL_SIZE_LIMIT / 1_000_000);
        // Idle now: within a few checkpointer passes past WAL_IDLE_TICKS it is cut back.
        let deadline = std::time::Instant::now() + CHECKPOINT_EVERY * WAL_IDLE_TICKS * 6;
        while wal_len() > WAL_SIZE_LIMIT && std::time::Instant::now() < deadline {
            tokio::time::sleep(CHECKPOINT_EVERY).await;
        }
        assert!(wal_len() <= WAL_SIZE_LIMIT, "the idle store kept a WAL of {} MB", wal_len() / 1_000_000);
        // Nothing was lost in the cut.
        assert_eq!(store.depths().await.unwrap().inbox, (rounds * 1000) as u64);
        store.close().await;
    }
}
