//! The `symphony` channel kind: a bot service account on a Symphony pod.
//!
//! - [`settings`]: chatom's names, validated (one auth method, readable key, proxies).
//! - [`jwt`]: the bot's RSA key and the RS512 login JWT.
//! - [`http`]: one HTTP client per endpoint, each with its proxy, CAs and client certificate.
//! - [`auth`]: session and key-manager tokens (RSA or certificate; simplified key delivery).
//! - [`api`]: pod and agent calls with the session's headers; re-authentication on 401.
//! - [`datafeed`]: the connector reading datafeed v2 (or v1) into the inbox.
//! - [`event`], [`presentation`]: which events are answered; PresentationML to text.
//! - [`messageml`]: replies as escaped, split MessageML.
//! - [`channel`]: sending replies (with `error_room` / `inform_client`) and `check`.

pub mod api;
pub mod auth;
pub mod channel;
pub mod datafeed;
pub mod event;
pub mod http;
pub mod jwt;
pub mod messageml;
pub mod presentation;
pub mod settings;

use patchbay_channel_core::{BuildEnv, Channel, ChannelKind, SettingsError};
use std::sync::Arc;

pub use settings::Settings;

pub struct SymphonyKind;

impl ChannelKind for SymphonyKind {
    fn name(&self) -> &'static str {
        "symphony"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        settings::SECRET_FIELDS
    }

    fn build(&self, settings: &serde_json::Value, env: &BuildEnv) -> Result<Arc<dyn Channel>, SettingsError> {
        let settings = Settings::parse(settings)?;
        let clients = http::Clients::new(&settings)?;
        Ok(Arc::new(channel::SymphonyChannel::new(env.channel_id.clone(), api::Api::new(settings, clients))))
    }
}
