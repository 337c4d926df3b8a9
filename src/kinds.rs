//! The channel kinds this build knows. Adding a platform is adding its crate and one line here.

use patchbay_channel_core::ChannelKind;
use std::sync::Arc;

pub fn all() -> Vec<Arc<dyn ChannelKind>> {
    vec![
        Arc::new(patchbay_channel_loopback::LoopbackKind),
        Arc::new(patchbay_channel_mattermost::MattermostKind),
        Arc::new(patchbay_channel_symphony::SymphonyKind),
        Arc::new(patchbay_channel_slack::SlackKind),
        Arc::new(patchbay_channel_webchat::WebchatKind),
    ]
}
