//! `echo`: answers `echo: <text>`. The embedded default, so patchbay does something with no
//! setup, and the assistant of the tests and the benchmarks.

use super::*;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Accepted so an echo assistant can push replies too (tests of the conversations API).
    #[serde(default)]
    #[allow(dead_code)]
    api_key: Option<String>,
}

pub fn build(settings: &serde_json::Value) -> Result<Arc<dyn Assistant>, SettingsError> {
    let _: Settings = patchbay_channel_core::parse_settings(settings)?;
    Ok(Arc::new(Echo))
}

struct Echo;

#[async_trait]
impl Assistant for Echo {
    async fn respond(&self, request: AssistantRequest) -> AssistantStream {
        let reply = Reply::text(format!("echo: {}", request.text));
        Box::pin(futures_util::stream::once(async move { Ok(AssistantEvent::Reply(reply)) }))
    }
}
