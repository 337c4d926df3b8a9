//! The registry: every assistant and channel, from config and from the admin API, in one
//! place. The store holds the truth; an in-memory snapshot serves the hot path; a change feed
//! (a `watch` of the snapshot) tells the supervisor to start and stop connectors.

use crate::assistants::{self, Assistant};
use crate::config::{self, Config, ConfigError, Table};
use crate::seal::Sealer;
use crate::store::{AssistantRecord, ChannelRecord, Source, Store, StoreError, Upsert};
use arc_swap::ArcSwap;
use patchbay_channel_core::{
    ids::valid_name, BuildEnv, Channel, ChannelId, ChannelKind, ConversationLog, HookId, Secret, SettingsError,
    StatusHandle,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RegistryError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        RegistryError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A channel as the hot path sees it.
pub struct ChannelEntry {
    pub record: ChannelRecord,
    /// Names of the secret fields that have a value (shown as `"set": true`).
    pub secrets_set: Vec<String>,
    /// `None` when the stored settings no longer build (say, the encryption key changed).
    pub instance: Option<Arc<dyn Channel>>,
    pub build_error: Option<String>,
    pub status: StatusHandle,
    pub callback_url: String,
}

pub struct AssistantEntry {
    pub record: AssistantRecord,
    pub secrets_set: Vec<String>,
    pub backend: Option<Arc<dyn Assistant>>,
    pub build_error: Option<String>,
}

#[derive(Default)]
pub struct Snapshot {
    pub version: i64,
    pub channels: BTreeMap<String, Arc<ChannelEntry>>,
    pub by_hook: HashMap<(String, String), Arc<ChannelEntry>>,
    pub assistants: BTreeMap<String, Arc<AssistantEntry>>,
}

impl Snapshot {
    /// Channels whose queued work must wait: disabled ones.
    pub fn paused_channels(&self) -> Vec<String> {
        self.channels
            .values()
            .filter(|c| !c.record.enabled)
            .map(|c| c.record.id.clone())
            .collect()
    }
}

/// A channel to create, as the admin API or config gives it. Secret fields carry their
/// values inside `settings`.
pub struct NewChannel {
    pub id: String,
    pub kind: String,
    pub assistant: String,
    pub enabled: bool,
    pub hook_id: Option<String>,
    pub settings: serde_json::Map<String, Value>,
}

pub struct NewAssistant {
    pub id: String,
    pub backend: String,
    pub settings: serde_json::Map<String, Value>,
}

pub struct Registry {
    store: Arc<dyn Store>,
    kinds: HashMap<&'static str, Arc<dyn ChannelKind>>,
    sealer: Sealer,
    http: reqwest::Client,
    public_url: String,
    log: Arc<dyn ConversationLog>,
    snapshot: ArcSwap<Snapshot>,
    feed: watch::Sender<Arc<Snapshot>>,
    statuses: Mutex<HashMap<String, StatusHandle>>,
    reload_lock: tokio::sync::Mutex<()>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Splits settings into (plain settings, secrets), checking that secrets are strings.
fn split_secrets(
    settings: &serde_json::Map<String, Value>,
    secret_fields: &[&str],
) -> Result<(serde_json::Map<String, Value>, serde_json::Map<String, Value>), SettingsError> {
    let mut plain = serde_json::Map::new();
    let mut secrets = serde_json::Map::new();
    for (k, v) in settings {
        if secret_fields.contains(&k.as_str()) {
            match v {
                Value::String(_) => {
                    secrets.insert(k.clone(), v.clone());
                }
                Value::Number(n) => {
                    secrets.insert(k.clone(), Value::String(n.to_string()));
                }
                Value::Null => {}
                _ => return Err(SettingsError::new(k.clone(), "a secret must be a string")),
            }
        } else {
            plain.insert(k.clone(), v.clone());
        }
    }
    Ok((plain, secrets))
}

fn merged(plain: &Value, secrets: &serde_json::Map<String, Value>) -> Value {
    let mut all = plain.as_object().cloned().unwrap_or_default();
    for (k, v) in secrets {
        all.insert(k.clone(), v.clone());
    }
    Value::Object(all)
}

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        kinds: Vec<Arc<dyn ChannelKind>>,
        sealer: Sealer,
        http: reqwest::Client,
        public_url: String,
        log: Arc<dyn ConversationLog>,
    ) -> Arc<Registry> {
        let empty = Arc::new(Snapshot::default());
        let (feed, _) = watch::channel(empty.clone());
        Arc::new(Registry {
            store,
            kinds: kinds.into_iter().map(|k| (k.name(), k)).collect(),
            sealer,
            http,
            public_url,
            log,
            snapshot: ArcSwap::new(empty),
            feed,
            statuses: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The change feed: the newest snapshot, whenever it changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.feed.subscribe()
    }

    pub fn kind_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.kinds.keys().copied().collect();
        v.sort();
        v
    }

    pub fn callback_url(&self, kind: &str, hook_id: &str) -> String {
        format!("{}/hooks/{kind}/{hook_id}", self.public_url)
    }

    fn status_for(&self, id: &str) -> StatusHandle {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    fn kind(&self, name: &str) -> Result<&Arc<dyn ChannelKind>, RegistryError> {
        self.kinds.get(name).ok_or_else(|| {
            RegistryError::invalid("kind", format!("unknown kind `{name}`: known kinds are {}", self.kind_names().join(", ")))
        })
    }

    fn open_secrets(&self, context: &str, sealed: &Option<Vec<u8>>) -> Result<serde_json::Map<String, Value>, String> {
        match sealed {
            None => Ok(Default::default()),
            Some(bytes) => {
                let plain = self.sealer.open(context, bytes).map_err(|e| e.to_string())?;
                serde_json::from_slice(&plain).map_err(|e| e.to_string())
            }
        }
    }

    fn seal_secrets(&self, context: &str, secrets: &serde_json::Map<String, Value>) -> Option<Vec<u8>> {
        (!secrets.is_empty()).then(|| self.sealer.seal(context, Value::Object(secrets.clone()).to_string().as_bytes()))
    }

    fn build_env(&self, id: &str, kind: &str, hook_id: &str) -> BuildEnv {
        BuildEnv {
            channel_id: ChannelId::from_trusted(id.to_owned()),
            hook_id: HookId::from_trusted(hook_id.to_owned()),
            callback_url: self.callback_url(kind, hook_id),
            http: self.http.clone(),
            log: self.log.clone(),
            signing_key: self.sealer.derive_key(&format!("channel:{id}")),
            kv: Arc::new(crate::store::StoreKv { store: self.store.clone(), sealer: self.sealer.clone() }),
        }
    }

    /// Validates and builds a channel from a kind and its full settings.
    fn build_channel(&self, id: &str, kind: &str, hook_id: &str, settings: &Value) -> Result<Arc<dyn Channel>, RegistryError> {
        let k = self.kind(kind)?;
        k.build(settings, &self.build_env(id, kind, hook_id))
            .map_err(|e| RegistryError::invalid(e.field, e.message))
    }

    fn instantiate_channel(&self, rec: &ChannelRecord, previous: Option<&Arc<ChannelEntry>>) -> ChannelEntry {
        let status = self.status_for(&rec.id);
        let callback_url = self.callback_url(&rec.kind, &rec.hook_id);
        let secrets = self.open_secrets(&format!("channel:{}", rec.id), &rec.sealed_secrets);
        let secrets_set = secrets.as_ref().map(|s| s.keys().cloned().collect()).unwrap_or_default();
        // Reuse the running instance when nothing it was built from changed (a toggle), so
        // in-memory state and connections survive.
        if let Some(prev) = previous.filter(|p| {
            p.instance.is_some()
                && p.record.kind == rec.kind
                && p.record.hook_id == rec.hook_id
                && p.record.settings == rec.settings
                && p.record.sealed_secrets == rec.sealed_secrets
        }) {
            return ChannelEntry {
                record: rec.clone(),
                secrets_set,
                instance: prev.instance.clone(),
                build_error: None,
                status,
                callback_url,
            };
        }
        let built = secrets
            .map_err(|e| format!("secrets: {e}"))
            .and_then(|s| {
                self.build_channel(&rec.id, &rec.kind, &rec.hook_id, &merged(&rec.settings, &s))
                    .map_err(|e| e.to_string())
            });
        let (instance, build_error) = match built {
            Ok(i) => (Some(i), None),
            Err(e) => {
                tracing::error!(channel = %rec.id, error = %e, "channel cannot be built");
                status.failed(format!("the channel's settings do not build: {e}"));
                (None, Some(e))
            }
        };
        ChannelEntry {
            record: rec.clone(),
            secrets_set,
            instance,
            build_error,
            status,
            callback_url,
        }
    }

    fn instantiate_assistant(&self, rec: &AssistantRecord, previous: Option<&Arc<AssistantEntry>>) -> AssistantEntry {
        let secrets = self.open_secrets(&format!("assistant:{}", rec.id), &rec.sealed_secrets);
        let mut secrets_set: Vec<String> = secrets.as_ref().map(|s| s.keys().cloned().collect()).unwrap_or_default();
        if rec.api_key_hash.is_some() {
            secrets_set.push("api_key".into());
        }
        if let Some(prev) = previous.filter(|p| {
            p.backend.is_some()
                && p.record.backend == rec.backend
                && p.record.settings == rec.settings
                && p.record.sealed_secrets == rec.sealed_secrets
        }) {
            return AssistantEntry {
                record: rec.clone(),
                secrets_set,
                backend: prev.backend.clone(),
                build_error: None,
            };
        }
        let built = secrets.map_err(|e| format!("secrets: {e}")).and_then(|s| {
            assistants::build(&rec.id, &rec.backend, &merged(&rec.settings, &s), &self.assistant_env()).map_err(|e| e.to_string())
        });
        match built {
            Ok(b) => AssistantEntry {
                record: rec.clone(),
                secrets_set,
                backend: Some(b),
                build_error: None,
            },
            Err(e) => {
                tracing::error!(assistant = %rec.id, error = %e, "assistant cannot be built");
                AssistantEntry {
                    record: rec.clone(),
                    secrets_set,
                    backend: None,
                    build_error: Some(e),
                }
            }
        }
    }

    /// Reads the registry from the store and publishes a new snapshot (and a change-feed
    /// event) when it differs from the current one.
    pub async fn reload(&self) -> Result<(), RegistryError> {
        let _guard = self.reload_lock.lock().await;
        let (version, assistants, channels) = self.store.load_registry().await?;
        let old = self.snapshot();
        if version == old.version && !(old.channels.is_empty() && old.assistants.is_empty()) {
            return Ok(());
        }
        let mut snap = Snapshot {
            version,
            ..Default::default()
        };
        for a in &assistants {
            let entry = Arc::new(self.instantiate_assistant(a, old.assistants.get(&a.id)));
            snap.assistants.insert(a.id.clone(), entry);
        }
        for c in &channels {
            let entry = Arc::new(self.instantiate_channel(c, old.channels.get(&c.id)));
            snap.by_hook.insert((c.kind.clone(), c.hook_id.clone()), entry.clone());
            snap.channels.insert(c.id.clone(), entry);
        }
        let snap = Arc::new(snap);
        self.snapshot.store(snap.clone());
        self.feed.send_replace(snap);
        Ok(())
    }

    /// Follows changes made by other replicas (or another process on the same database):
    /// polls the registry version and reloads when it moved.
    pub async fn follow(self: Arc<Self>, every: std::time::Duration, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.store.registry_version().await {
                Ok(v) if v != self.snapshot().version => {
                    if let Err(e) = self.reload().await {
                        tracing::warn!(error = %e, "registry reload failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the registry version"),
            }
        }
    }

    // ---- config ----

    /// Validates the assistants and channels a config declares, without touching the store.
    pub fn check_config(&self, cfg: &Config) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        for (id, table) in &cfg.assistants {
            if let Err(e) = self.prepare_assistant_from_config(id, table) {
                errors.push(e);
            }
        }
        for (id, table) in &cfg.channels {
            match self.prepare_channel_from_config(id, table) {
                Ok(ch) => {
                    if !cfg.assistants.contains_key(&ch.assistant) {
                        errors.push(ConfigError::new(
                            format!("channels.{id}.assistant"),
                            format!("no assistant `{}` is declared under [assistants]", ch.assistant),
                        ));
                    }
                    let hook = ch.hook_id.clone().unwrap_or_else(|| HookId::generate().to_string());
                    if let Err(e) = self.build_channel(id, &ch.kind, &hook, &Value::Object(ch.settings.clone())) {
                        errors.push(config_error("channels", id, e));
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    fn assistant_env(&self) -> assistants::AssistantEnv {
        assistants::AssistantEnv { http: self.http.clone(), log: self.log.clone() }
    }

    fn prepare_assistant_from_config(&self, id: &str, table: &Table) -> Result<NewAssistant, ConfigError> {
        let key = |f: &str| format!("assistants.{id}.{f}");
        let backend = table
            .get("backend")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ConfigError::new(key("backend"), "is required: echo, webhook or openai"))?
            .to_owned();
        let mut settings = table.clone();
        settings.remove("backend");
        for field in assistants::secret_fields(&backend) {
            if let Some(raw) = settings.get(*field).and_then(|v| v.as_str()).map(str::to_owned) {
                let secret = config::resolve_secret(&key(field), &raw)?;
                settings.insert((*field).to_owned(), Value::String(secret.expose().to_owned()));
            }
        }
        assistants::build(id, &backend, &Value::Object(settings.clone()), &self.assistant_env())
            .map_err(|e| ConfigError::new(key(&e.field), e.message))?;
        Ok(NewAssistant {
            id: id.to_owned(),
            backend,
            settings,
        })
    }

    fn prepare_channel_from_config(&self, id: &str, table: &Table) -> Result<NewChannel, ConfigError> {
        let key = |f: &str| format!("channels.{id}.{f}");
        let mut settings = table.clone();
        let kind = match settings.remove("kind") {
            Some(Value::String(k)) => k,
            _ => {
                return Err(ConfigError::new(
                    key("kind"),
                    format!("is required: one of {}", self.kind_names().join(", ")),
                ))
            }
        };
        let k = self.kind(&kind).map_err(|e| ConfigError::new(key("kind"), e.to_string().trim_start_matches("kind: ")))?;
        let assistant = match settings.remove("assistant") {
            Some(Value::String(a)) => a,
            _ => return Err(ConfigError::new(key("assistant"), "is required: the id of an assistant")),
        };
        let enabled = match settings.remove("enabled") {
            None => true,
            Some(Value::Bool(b)) => b,
            Some(_) => return Err(ConfigError::new(key("enabled"), "must be true or false")),
        };
        let hook_id = match settings.remove("hook_id") {
            None => None,
            Some(Value::String(h)) => Some(HookId::parse(&h).map_err(|e| ConfigError::new(key("hook_id"), e))?.to_string()),
            Some(_) => return Err(ConfigError::new(key("hook_id"), "must be a string")),
        };
        for field in k.secret_fields() {
            if let Some(raw) = settings.get(*field).and_then(|v| v.as_str()).map(str::to_owned) {
                let secret = config::resolve_secret(&key(field), &raw)?;
                settings.insert((*field).to_owned(), Value::String(secret.expose().to_owned()));
            }
        }
        Ok(NewChannel {
            id: id.to_owned(),
            kind,
            assistant,
            enabled,
            hook_id,
            settings,
        })
    }

    /// Brings the store in line with the config: config assistants and channels are created
    /// or refreshed (a channel keeps its stored `enabled` and hook id), and those removed from
    /// the config are removed from the store.
    pub async fn apply_config(&self, cfg: &Config) -> Result<(), config::ConfigErrors> {
        let errors = self.check_config(cfg);
        if !errors.is_empty() {
            return Err(config::ConfigErrors(errors));
        }
        let store_err = |e: StoreError| config::ConfigErrors(vec![ConfigError::new("store", e.to_string())]);
        let (_, stored_assistants, stored_channels) = self.store.load_registry().await.map_err(store_err)?;
        let now = patchbay_channel_core::now_ms();
        for (id, table) in &cfg.assistants {
            let a = self.prepare_assistant_from_config(id, table).map_err(|e| config::ConfigErrors(vec![e]))?;
            let rec = self.assistant_record(a, Source::Config, now, stored_assistants.iter().find(|s| &s.id == id));
            self.store.put_assistant(rec).await.map_err(store_err)?;
        }
        for (id, table) in &cfg.channels {
            let c = self.prepare_channel_from_config(id, table).map_err(|e| config::ConfigErrors(vec![e]))?;
            let existing = stored_channels.iter().find(|s| &s.id == id);
            if existing.is_some_and(|e| e.source == Source::Api) {
                tracing::warn!(channel = %id, "a channel created through the admin API is now declared in config; config wins");
            }
            let rec = self.channel_record(c, Source::Config, now, existing);
            self.store
                .put_channel(rec, Upsert::KeepStateFromStore)
                .await
                .map_err(|e| config::ConfigErrors(vec![ConfigError::new(format!("channels.{id}"), e.to_string())]))?;
        }
        for c in stored_channels.iter().filter(|c| c.source == Source::Config && !cfg.channels.contains_key(&c.id)) {
            tracing::info!(channel = %c.id, "removed from config: deleting");
            self.store.delete_channel(&c.id).await.map_err(store_err)?;
        }
        for a in stored_assistants.iter().filter(|a| a.source == Source::Config && !cfg.assistants.contains_key(&a.id)) {
            tracing::info!(assistant = %a.id, "removed from config: deleting");
            if let Err(e) = self.store.delete_assistant(&a.id).await {
                tracing::warn!(assistant = %a.id, error = %e, "cannot delete an assistant removed from config");
            }
        }
        self.reload().await.map_err(|e| config::ConfigErrors(vec![ConfigError::new("store", e.to_string())]))
    }

    fn assistant_record(&self, a: NewAssistant, source: Source, now: i64, existing: Option<&AssistantRecord>) -> AssistantRecord {
        let (plain, mut secrets) = split_secrets(&a.settings, assistants::secret_fields(&a.backend)).unwrap_or_default();
        let api_key_hash = secrets
            .remove("api_key")
            .and_then(|v| v.as_str().map(sha256_hex))
            .or_else(|| existing.and_then(|e| e.api_key_hash.clone()));
        AssistantRecord {
            sealed_secrets: self.seal_secrets(&format!("assistant:{}", a.id), &secrets),
            id: a.id,
            backend: a.backend,
            settings: Value::Object(plain),
            api_key_hash,
            source,
            created_at: existing.map(|e| e.created_at).unwrap_or(now),
            updated_at: now,
        }
    }

    fn channel_record(&self, c: NewChannel, source: Source, now: i64, existing: Option<&ChannelRecord>) -> ChannelRecord {
        let secret_fields = self.kinds.get(c.kind.as_str()).map(|k| k.secret_fields()).unwrap_or(&[]);
        let (plain, secrets) = split_secrets(&c.settings, secret_fields).unwrap_or_default();
        // Sealing uses a fresh nonce each time, so re-seal only when the secrets changed;
        // otherwise every restart would look like a settings change.
        let sealed = match existing {
            Some(e)
                if self.open_secrets(&format!("channel:{}", c.id), &e.sealed_secrets).ok().as_ref()
                    == Some(&secrets) =>
            {
                e.sealed_secrets.clone()
            }
            _ => self.seal_secrets(&format!("channel:{}", c.id), &secrets),
        };
        ChannelRecord {
            hook_id: c
                .hook_id
                .or_else(|| existing.map(|e| e.hook_id.clone()))
                .unwrap_or_else(|| HookId::generate().to_string()),
            id: c.id,
            kind: c.kind,
            assistant: c.assistant,
            enabled: c.enabled,
            settings: Value::Object(plain),
            sealed_secrets: sealed,
            source,
            created_at: existing.map(|e| e.created_at).unwrap_or(now),
            updated_at: now,
        }
    }

    // ---- admin API operations ----

    pub async fn create_channel(&self, c: NewChannel) -> Result<Arc<ChannelEntry>, RegistryError> {
        valid_name(&c.id).map_err(|e| RegistryError::invalid("id", e))?;
        let snap = self.snapshot();
        if snap.channels.contains_key(&c.id) {
            return Err(RegistryError::Conflict(format!("a channel `{}` already exists", c.id)));
        }
        if !snap.assistants.contains_key(&c.assistant) {
            return Err(RegistryError::invalid("assistant", format!("no assistant `{}` exists", c.assistant)));
        }
        let k = self.kind(&c.kind)?.clone();
        if let Some(h) = &c.hook_id {
            HookId::parse(h).map_err(|e| RegistryError::invalid("hook_id", e))?;
        }
        split_secrets(&c.settings, k.secret_fields()).map_err(|e| RegistryError::invalid(format!("settings.{}", e.field), e.message))?;
        let hook = c.hook_id.clone().unwrap_or_default();
        self.build_channel(&c.id, &c.kind, if hook.is_empty() { "validation" } else { &hook }, &Value::Object(c.settings.clone()))
            .map_err(prefix_settings)?;
        let id = c.id.clone();
        let rec = self.channel_record(c, Source::Api, patchbay_channel_core::now_ms(), None);
        self.store.put_channel(rec, Upsert::Insert).await.map_err(conflict)?;
        self.reload().await?;
        self.snapshot().channels.get(&id).cloned().ok_or_else(|| RegistryError::NotFound(format!("channel `{id}`")))
    }

    /// Changes a channel: `enabled`, `assistant`, and settings merged key by key (`null`
    /// removes a key; secrets not given are kept).
    pub async fn update_channel(
        &self,
        id: &str,
        enabled: Option<bool>,
        assistant: Option<String>,
        settings: Option<serde_json::Map<String, Value>>,
    ) -> Result<Arc<ChannelEntry>, RegistryError> {
        let entry = self.channel(id)?;
        if assistant.is_some() || settings.is_some() {
            if entry.record.source == Source::Config {
                return Err(RegistryError::Conflict(format!(
                    "channel `{id}` is declared in config: change its settings there (only `enabled` can be changed here)"
                )));
            }
            let k = self.kind(&entry.record.kind)?.clone();
            let current_secrets = self
                .open_secrets(&format!("channel:{id}"), &entry.record.sealed_secrets)
                .map_err(|e| RegistryError::Conflict(format!("the stored secrets cannot be opened: {e}")))?;
            let mut all = merged(&entry.record.settings, &current_secrets).as_object().cloned().unwrap_or_default();
            for (key, value) in settings.unwrap_or_default() {
                if value.is_null() {
                    all.remove(&key);
                } else {
                    all.insert(key, value);
                }
            }
            split_secrets(&all, k.secret_fields()).map_err(|e| RegistryError::invalid(format!("settings.{}", e.field), e.message))?;
            let assistant = assistant.unwrap_or_else(|| entry.record.assistant.clone());
            if !self.snapshot().assistants.contains_key(&assistant) {
                return Err(RegistryError::invalid("assistant", format!("no assistant `{assistant}` exists")));
            }
            self.build_channel(id, &entry.record.kind, &entry.record.hook_id, &Value::Object(all.clone()))
                .map_err(prefix_settings)?;
            let rec = self.channel_record(
                NewChannel {
                    id: id.to_owned(),
                    kind: entry.record.kind.clone(),
                    assistant,
                    enabled: enabled.unwrap_or(entry.record.enabled),
                    hook_id: Some(entry.record.hook_id.clone()),
                    settings: all,
                },
                Source::Api,
                patchbay_channel_core::now_ms(),
                Some(&entry.record),
            );
            // The edit leaves `enabled` to the store, so it cannot undo a concurrent toggle.
            self.store.put_channel(rec, Upsert::Edit).await.map_err(conflict)?;
        }
        if let Some(e) = enabled {
            self.store.set_channel_enabled(id, e).await?;
        }
        self.reload().await?;
        self.channel(id)
    }

    pub async fn delete_channel(&self, id: &str) -> Result<(), RegistryError> {
        let entry = self.channel(id)?;
        if entry.record.source == Source::Config {
            return Err(RegistryError::Conflict(format!(
                "channel `{id}` is declared in config: remove it there"
            )));
        }
        self.store.delete_channel(id).await?;
        self.reload().await
    }

    /// Rotates the channel's hook id: the old callback URL stops working at once.
    pub async fn rotate_hook(&self, id: &str) -> Result<Arc<ChannelEntry>, RegistryError> {
        let entry = self.channel(id)?;
        let mut rec = entry.record.clone();
        rec.hook_id = HookId::generate().to_string();
        rec.updated_at = patchbay_channel_core::now_ms();
        self.store.put_channel(rec, Upsert::RotateHook).await.map_err(conflict)?;
        self.reload().await?;
        self.channel(id)
    }

    pub fn channel(&self, id: &str) -> Result<Arc<ChannelEntry>, RegistryError> {
        self.snapshot()
            .channels
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("channel `{id}`")))
    }

    pub fn assistant(&self, id: &str) -> Result<Arc<AssistantEntry>, RegistryError> {
        self.snapshot()
            .assistants
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("assistant `{id}`")))
    }

    /// Creates an assistant. When no `api_key` is given one is generated; it is answered
    /// once, here, and only its hash is stored.
    pub async fn create_assistant(&self, mut a: NewAssistant) -> Result<(Arc<AssistantEntry>, Option<Secret>), RegistryError> {
        valid_name(&a.id).map_err(|e| RegistryError::invalid("id", e))?;
        if self.snapshot().assistants.contains_key(&a.id) {
            return Err(RegistryError::Conflict(format!("an assistant `{}` already exists", a.id)));
        }
        let generated = if a.settings.get("api_key").is_none_or(|v| v.is_null()) {
            let key = Secret::new(format!("pbk_{}", patchbay_channel_core::ids::random_token(40)));
            a.settings.insert("api_key".into(), Value::String(key.expose().to_owned()));
            Some(key)
        } else {
            None
        };
        split_secrets(&a.settings, assistants::secret_fields(&a.backend))
            .map_err(|e| RegistryError::invalid(format!("settings.{}", e.field), e.message))?;
        assistants::build(&a.id, &a.backend, &Value::Object(a.settings.clone()), &self.assistant_env()).map_err(|e| {
            if e.field == "backend" {
                RegistryError::invalid("backend", e.message)
            } else {
                RegistryError::invalid(format!("settings.{}", e.field), e.message)
            }
        })?;
        let id = a.id.clone();
        let rec = self.assistant_record(a, Source::Api, patchbay_channel_core::now_ms(), None);
        self.store.insert_assistant(rec).await.map_err(conflict)?;
        self.reload().await?;
        Ok((self.assistant(&id)?, generated))
    }

    pub async fn update_assistant(&self, id: &str, settings: serde_json::Map<String, Value>) -> Result<Arc<AssistantEntry>, RegistryError> {
        let entry = self.assistant(id)?;
        if entry.record.source == Source::Config {
            return Err(RegistryError::Conflict(format!(
                "assistant `{id}` is declared in config: change it there"
            )));
        }
        let secrets = self
            .open_secrets(&format!("assistant:{id}"), &entry.record.sealed_secrets)
            .map_err(|e| RegistryError::Conflict(format!("the stored secrets cannot be opened: {e}")))?;
        let mut all = merged(&entry.record.settings, &secrets).as_object().cloned().unwrap_or_default();
        for (k, v) in settings {
            if v.is_null() {
                all.remove(&k);
            } else {
                all.insert(k, v);
            }
        }
        split_secrets(&all, assistants::secret_fields(&entry.record.backend))
            .map_err(|e| RegistryError::invalid(format!("settings.{}", e.field), e.message))?;
        assistants::build(id, &entry.record.backend, &Value::Object(all.clone()), &self.assistant_env())
            .map_err(|e| RegistryError::invalid(format!("settings.{}", e.field), e.message))?;
        let rec = self.assistant_record(
            NewAssistant {
                id: id.to_owned(),
                backend: entry.record.backend.clone(),
                settings: all,
            },
            Source::Api,
            patchbay_channel_core::now_ms(),
            Some(&entry.record),
        );
        self.store.put_assistant(rec).await?;
        self.reload().await?;
        self.assistant(id)
    }

    pub async fn delete_assistant(&self, id: &str) -> Result<(), RegistryError> {
        let entry = self.assistant(id)?;
        if entry.record.source == Source::Config {
            return Err(RegistryError::Conflict(format!("assistant `{id}` is declared in config: remove it there")));
        }
        match self.store.delete_assistant(id).await {
            Err(StoreError::Conflict(m)) => Err(RegistryError::Conflict(m)),
            Err(e) => Err(e.into()),
            Ok(_) => self.reload().await,
        }
    }

    /// The assistant whose key this is, compared in constant time against each stored hash.
    pub fn assistant_by_key(&self, presented: &str) -> Option<Arc<AssistantEntry>> {
        let hash = sha256_hex(presented);
        let mut found = None;
        for a in self.snapshot().assistants.values() {
            if let Some(h) = &a.record.api_key_hash {
                if patchbay_channel_core::ct_eq(h.as_bytes(), hash.as_bytes()) {
                    found = Some(a.clone());
                }
            }
        }
        found
    }
}

fn config_error(section: &str, id: &str, e: RegistryError) -> ConfigError {
    match e {
        RegistryError::Invalid { field, message } => ConfigError::new(format!("{section}.{id}.{field}"), message),
        other => ConfigError::new(format!("{section}.{id}"), other.to_string()),
    }
}

fn prefix_settings(e: RegistryError) -> RegistryError {
    match e {
        RegistryError::Invalid { field, message } if field != "kind" => RegistryError::Invalid {
            field: format!("settings.{field}"),
            message,
        },
        other => other,
    }
}

fn conflict(e: StoreError) -> RegistryError {
    match e {
        StoreError::Conflict(m) => RegistryError::Conflict(m),
        other => RegistryError::Store(other),
    }
}
