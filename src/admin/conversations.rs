//! `POST /api/v1/conversations/{id}/replies`: an assistant pushes replies later (after
//! answering 202/204), with its own key. A key reaches only its own assistant's
//! conversations; any other conversation looks the same as one that does not exist.

use super::{bearer, json_body, respond, ApiError};
use crate::server::AppState;
use crate::store::NewOutbox;
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use patchbay_channel_core::{ChannelId, ConversationId, OutboundReply, Reply};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushReplies {
    replies: Vec<Reply>,
}

pub async fn push_replies(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let Some(key) = bearer(&req) else {
        return respond(Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the assistant's key as `Authorization: Bearer <key>`",
        )
        .field("Authorization")));
    };
    let Some(assistant) = state.registry.assistant_by_key(key) else {
        return respond(Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "this key belongs to no assistant")
            .field("Authorization")));
    };
    let push: PushReplies = match json_body(body, &state).await {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    if push.replies.is_empty() {
        return respond(Err(ApiError::bad_request("replies", "give at least one reply")));
    }
    if let Some((i, _)) = push.replies.iter().enumerate().find(|(_, r)| r.text.is_empty() && r.attachments.is_empty()) {
        return respond(Err(ApiError::bad_request(format!("replies[{i}].text"), "a reply needs text or attachments")));
    }
    let conversation = match state.store.conversation(&path).await {
        Ok(c) => c,
        Err(e) => return respond(Err(e.into())),
    };
    let snap = state.registry.snapshot();
    let channel = conversation
        .as_ref()
        .and_then(|c| snap.channels.get(&c.channel_id))
        .filter(|ch| ch.record.assistant == assistant.record.id);
    let (Some(conv), Some(channel)) = (conversation, channel) else {
        return respond(Err(ApiError::not_found(format!("conversation `{}`", path.as_str()))));
    };
    // With an Idempotency-Key, the reply ids are derived from it, so a repeated push queues
    // nothing new while the first is still queued.
    let base = match req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()) {
        Some(k) => {
            let mut h = Sha256::new();
            h.update(conv.id.as_bytes());
            h.update([0]);
            h.update(k.as_bytes());
            hex::encode(h.finalize())[..24].to_owned()
        }
        None => patchbay_channel_core::ids::random_token(24),
    };
    let now = patchbay_channel_core::now_ms();
    let rows: Vec<NewOutbox> = push
        .replies
        .into_iter()
        .enumerate()
        .map(|(i, reply)| {
            let out = OutboundReply {
                reply_id: format!("p_{base}_{i}"),
                channel_id: ChannelId::from_trusted(conv.channel_id.clone()),
                conversation_id: ConversationId::from_trusted(conv.id.clone()),
                platform_conversation: conv.platform_conversation.clone(),
                thread: reply.thread.clone().or_else(|| conv.thread.clone()),
                route: conv.route.clone(),
                reply,
                attempt: 0,
                draft: None,
            };
            NewOutbox {
                reply_id: out.reply_id.clone(),
                channel_id: channel.record.id.clone(),
                conversation_id: conv.id.clone(),
                payload: serde_json::to_string(&out).unwrap_or_default(),
                received_at: now,
                not_before: 0,
                held_by: None,
                dead_letter: None,
                attempts: 0,
                last_error: None,
            }
        })
        .collect();
    let ids: Vec<String> = rows.iter().map(|r| r.reply_id.clone()).collect();
    match state.store.outbox_put(rows).await {
        Ok(_) => {
            state.pipeline.outbox_wake.notify_one();
            HttpResponse::Accepted().json(serde_json::json!({ "reply_ids": ids }))
        }
        Err(e) => respond(Err(e.into())),
    }
}
