//! Printing: one JSON object per line with `--json`, else a readable line.

use serde_json::Value;
use starling_client::{ClientError, json as sj};

/// Prints results in the chosen format.
pub(crate) struct Out {
    pub(crate) json: bool,
}

impl Out {
    pub(crate) fn print(&self, v: &Value) {
        if self.json {
            println!("{v}");
        } else {
            println!("{}", human(v));
        }
    }
}

/// One readable line for a JSON result.
pub(crate) fn human(v: &Value) -> String {
    let s = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match v["type"].as_str().unwrap_or_default() {
        "message" => {
            let mut body = if v["deleted"] == true {
                "[deleted for everyone]".to_owned()
            } else if let Some(why) = v.get("undecryptable") {
                format!(
                    "[end-to-end encrypted, undecryptable: {}]",
                    why.as_str().unwrap_or_default()
                )
            } else if v.get("text").is_some() {
                if v["e2e"] == true {
                    format!("[e2e] {}", s("text"))
                } else {
                    s("text")
                }
            } else {
                format!(
                    "<{} bytes of {}>",
                    s("body_hex").len() / 2,
                    s("content_type")
                )
            };
            if let Some(m) = v.get("media") {
                body.push_str(&format!(
                    " [file {:?}, {} bytes of {}, media_id {}]",
                    m["file_name"].as_str().unwrap_or_default(),
                    m["size_bytes"],
                    m["content_type"].as_str().unwrap_or_default(),
                    m["media_id"].as_str().unwrap_or_default()
                ));
            }
            if v.get("edited_ts_ms").is_some() {
                body.push_str(" (edited)");
            }
            if let Some(rs) = v["reactions"].as_array() {
                let rs: Vec<String> = rs
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {}",
                            r["emoji"].as_str().unwrap_or_default(),
                            r["user_id"]
                        )
                    })
                    .collect();
                body.push_str(&format!(" [reactions: {}]", rs.join(", ")));
            }
            let reply = match (v.get("reply_to_seq"), v.get("reply_quote")) {
                (Some(r), Some(q)) => {
                    format!(" (reply to #{r}: {:?})", q.as_str().unwrap_or_default())
                }
                (Some(r), None) => format!(" (reply to #{r})"),
                _ => String::new(),
            };
            format!(
                "[conv {} #{}] user {}{reply}: {body}",
                s("conversation_id"),
                s("seq"),
                s("sender_user_id")
            )
        }
        "change" => {
            let what = match s("kind").as_str() {
                "edit" => match v.get("text") {
                    Some(t) => format!(
                        "edited #{} to {:?}",
                        s("target_seq"),
                        t.as_str().unwrap_or_default()
                    ),
                    None => format!("edited #{}", s("target_seq")),
                },
                "delete" => format!("deleted #{} for everyone", s("target_seq")),
                "react" if s("emoji").is_empty() => {
                    format!("removed their reaction to #{}", s("target_seq"))
                }
                "react" => format!("reacted {} to #{}", s("emoji"), s("target_seq")),
                other => format!("changed #{} ({other})", s("target_seq")),
            };
            format!(
                "[conv {} #{}] user {} {what}",
                s("conversation_id"),
                s("seq"),
                s("sender_user_id")
            )
        }
        "downloaded" => format!("downloaded {} bytes to {}", s("bytes"), s("path")),
        "sent" => format!(
            "sent: conv {} seq {} (client_msg_id {}{})",
            s("conversation_id"),
            s("seq"),
            s("client_msg_id"),
            if v["duplicate"] == true {
                ", duplicate"
            } else {
                ""
            }
        ),
        "receipt" => format!(
            "[conv {}] {} up to #{} by user {}",
            s("conversation_id"),
            s("kind"),
            s("up_to_seq"),
            s("by_user_id")
        ),
        "group_receipts" => {
            let per: Vec<String> = v["messages"]
                .as_array()
                .map(|ms| {
                    ms.iter()
                        .map(|m| {
                            format!(
                                "#{} delivered {}/{} read {}/{}",
                                m["seq"],
                                m["delivered"],
                                m["recipients"],
                                m["read"],
                                m["recipients"]
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!("[conv {}] {}", s("conversation_id"), per.join(", "))
        }
        "receipt_detail" => format!(
            "[conv {}] #{} by user {}: delivered to {} of {} {}, read by {}",
            s("conversation_id"),
            s("seq"),
            s("sender_user_id"),
            s("delivered"),
            s("recipients"),
            v["delivered_user_ids"],
            v["read_user_ids"]
        ),
        "conversation" => format!(
            "conv {} ({}) {} peer {} last #{} unread {}",
            s("conversation_id"),
            s("kind"),
            s("title"),
            s("peer_user_id"),
            s("last_seq"),
            s("unread_count")
        ),
        "error" => format!("error: {} {}", s("code"), s("message")),
        "push_registered" => format!(
            "device {}: {} push token registered",
            s("device_id"),
            s("platform")
        ),
        "push_unregistered" => format!("device {}: push token forgotten", s("device_id")),
        "typing" => format!(
            "[conv {}] user {} {}",
            s("conversation_id"),
            s("user_id"),
            if v["typing"] == true {
                "is typing…"
            } else {
                "stopped typing"
            }
        ),
        "group_changed" => format!(
            "[conv {} #{}] user {} {}: {}{}",
            s("conversation_id"),
            s("seq"),
            s("by_user_id"),
            s("kind").replace('_', " "),
            v["user_ids"]
                .as_array()
                .map(|u| u
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            if v.get("role").is_some() {
                format!(" → {}", s("role"))
            } else {
                String::new()
            }
        ),
        "presence" => {
            let seen = v["last_seen_ms"].as_u64().unwrap_or(0);
            format!(
                "user {}: {}{}",
                s("user_id"),
                s("state"),
                if seen > 0 {
                    format!(" (last seen {seen} ms since the epoch)")
                } else {
                    String::new()
                }
            )
        }
        "group" => {
            let members = v["members"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .map(|m| {
                            format!("{} ({})", m["user_id"], m["role"].as_str().unwrap_or("?"))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let listed = v["members"].as_array().map_or(0, Vec::len);
            let count = v["member_count"].as_u64().unwrap_or(0);
            let more = if count > listed as u64 {
                format!(" (the first {listed} of {count})")
            } else {
                String::new()
            };
            format!(
                "group {} \"{}\" v{}: {members}{more}",
                s("conversation_id"),
                s("name"),
                s("version")
            )
        }
        "connected" => format!(
            "connected as user {} device {}",
            s("user_id"),
            s("device_id")
        ),
        "server" => format!(
            "{} (protocol {}), features: {}; limits: frames {} B, bodies {} B, {} requests in flight, ping every {} ms, idle timeout {} ms",
            s("server_version"),
            s("protocol_version"),
            v["features"]
                .as_array()
                .map(|f| f
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            s("frame_bytes_max"),
            s("body_bytes_max"),
            s("inflight_requests_max"),
            s("heartbeat_ms"),
            s("idle_timeout_ms")
        ),
        "disconnected" => format!(
            "disconnected: {} (retry in {} ms)",
            s("reason"),
            s("retry_in_ms")
        ),
        "synced" => format!(
            "synced: {} messages, {} receipts",
            s("messages"),
            s("receipts")
        ),
        _ => {
            // Generic: key=value pairs after the type.
            let mut line = s("type");
            if let Value::Object(map) = v {
                for (k, val) in map.iter().filter(|(k, _)| *k != "type") {
                    let val = match val {
                        Value::String(x) => x.clone(),
                        x => x.to_string(),
                    };
                    line.push_str(&format!(" {k}={val}"));
                }
            }
            line
        }
    }
}

pub(crate) fn print_error(out: &Out, e: &ClientError) {
    if out.json {
        println!("{}", sj::error(e));
    } else {
        eprintln!("error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::human;

    #[test]
    fn a_message_shows_its_state_and_a_change_what_it_did() {
        let m = json!({
            "type": "message", "conversation_id": 5, "seq": 3, "sender_user_id": 1,
            "text": "hi", "edited_ts_ms": 9, "reply_to_seq": 2, "reply_quote": "yo",
            "reactions": [{ "user_id": 2, "emoji": "👍" }],
        });
        assert_eq!(
            human(&m),
            "[conv 5 #3] user 1 (reply to #2: \"yo\"): hi (edited) [reactions: 👍 2]"
        );
        let gone = json!({
            "type": "message", "conversation_id": 5, "seq": 1, "sender_user_id": 1,
            "deleted": true,
        });
        assert_eq!(human(&gone), "[conv 5 #1] user 1: [deleted for everyone]");
        let change = |kind: &str, extra: serde_json::Value| {
            let mut v = json!({
                "type": "change", "conversation_id": 5, "seq": 4, "sender_user_id": 2,
                "kind": kind, "target_seq": 1,
            });
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            human(&v)
        };
        assert_eq!(
            change("edit", json!({ "text": "new" })),
            "[conv 5 #4] user 2 edited #1 to \"new\""
        );
        assert_eq!(
            change("delete", json!({})),
            "[conv 5 #4] user 2 deleted #1 for everyone"
        );
        assert_eq!(
            change("react", json!({ "emoji": "🎉" })),
            "[conv 5 #4] user 2 reacted 🎉 to #1"
        );
        assert_eq!(
            change("react", json!({ "emoji": "" })),
            "[conv 5 #4] user 2 removed their reaction to #1"
        );
    }
}
