//! Compiles `proto/starling.proto` (and the files it imports) in pure Rust (protox: no system `protoc`),
//! generates the prost types, writes the file descriptor set (for reflection
//! and golden-vector tests), and generates `FrameKind`, one variant per
//! `Frame.body` case.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The entry point; it imports the other files of the package publicly.
    let proto = "proto/starling.proto";
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("starling_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    let frame_kinds = frame_kinds_source(&descriptors)?;
    std::fs::write(out_dir.join("frame_kinds.rs"), frame_kinds)?;

    prost_build::Config::new()
        // Every `bytes` field is `bytes::Bytes`: decoding from a `Bytes`
        // buffer slices it instead of copying (zero-copy message bodies).
        .bytes(["."])
        // Maps are BTreeMaps: encoding is deterministic (golden vectors,
        // stable re-encoding).
        .btree_map(["."])
        // Keep `Frame` small (it is moved on every decode): rarely present,
        // large nested messages live behind a Box. Hot fields stay inline.
        .boxed(".starling.v1.Send.media")
        .boxed(".starling.v1.Message.media")
        .boxed(".starling.v1.Message.group_changed")
        .boxed(".starling.v1.Send.change")
        .boxed(".starling.v1.Message.change")
        .boxed(".starling.v1.Send.set_timer")
        .boxed(".starling.v1.Message.timer_changed")
        .boxed(".starling.v1.Profile.avatar")
        .boxed(".starling.v1.UpdateProfile.avatar")
        .boxed(".starling.v1.CreateGroup.avatar")
        .boxed(".starling.v1.GroupInfo.avatar")
        .boxed(".starling.v1.UpdateGroup.avatar")
        .boxed(".starling.v1.ConversationSummary.last_message")
        .boxed(".starling.v1.GroupChanged.group")
        .compile_fds(descriptors)?;
    Ok(())
}

/// Generates `FrameKind` and `frame::Body::kind` from the `Frame.body` oneof.
fn frame_kinds_source(
    fds: &prost_types::FileDescriptorSet,
) -> Result<String, Box<dyn std::error::Error>> {
    let frame = fds
        .file
        .iter()
        .flat_map(|f| f.message_type.iter())
        .find(|m| m.name() == "Frame")
        .ok_or("no message Frame in starling.proto")?;
    let body_index = frame
        .oneof_decl
        .iter()
        .position(|o| o.name() == "body")
        .ok_or("no oneof body in Frame")?;
    let cases: Vec<(String, String, i32)> = frame
        .field
        .iter()
        .filter(|f| f.oneof_index == Some(body_index as i32))
        .map(|f| (f.name().to_owned(), upper_camel(f.name()), f.number()))
        .collect();

    let mut s = String::new();
    writeln!(
        s,
        "/// The case of `Frame.body`: one variant per frame type."
    )?;
    writeln!(
        s,
        "#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]"
    )?;
    writeln!(s, "pub enum FrameKind {{")?;
    for (name, camel, number) in &cases {
        writeln!(s, "    /// `Frame.{name}` (field {number}).")?;
        writeln!(s, "    {camel},")?;
    }
    writeln!(s, "}}\n")?;
    writeln!(s, "impl FrameKind {{")?;
    writeln!(s, "    /// Every frame kind, in field-number order.")?;
    writeln!(s, "    pub const ALL: &'static [FrameKind] = &[")?;
    for (_, camel, _) in &cases {
        writeln!(s, "        FrameKind::{camel},")?;
    }
    writeln!(s, "    ];\n")?;
    writeln!(
        s,
        "    /// The field name in `Frame.body` (stable; used in metrics and vector files)."
    )?;
    writeln!(s, "    pub const fn name(self) -> &'static str {{")?;
    writeln!(s, "        match self {{")?;
    for (name, camel, _) in &cases {
        writeln!(s, "            FrameKind::{camel} => \"{name}\",")?;
    }
    writeln!(s, "        }}\n    }}\n")?;
    writeln!(s, "    /// The field number in `Frame.body`.")?;
    writeln!(s, "    pub const fn field_number(self) -> u32 {{")?;
    writeln!(s, "        match self {{")?;
    for (_, camel, number) in &cases {
        writeln!(s, "            FrameKind::{camel} => {number},")?;
    }
    writeln!(s, "        }}\n    }}\n}}\n")?;
    writeln!(s, "impl crate::v1::frame::Body {{")?;
    writeln!(s, "    /// Which frame type this body is.")?;
    writeln!(s, "    pub fn kind(&self) -> FrameKind {{")?;
    writeln!(s, "        match self {{")?;
    for (_, camel, _) in &cases {
        writeln!(
            s,
            "            crate::v1::frame::Body::{camel}(_) => FrameKind::{camel},"
        )?;
    }
    writeln!(s, "        }}\n    }}\n}}")?;
    Ok(s)
}

/// `request_otp` → `RequestOtp`, as prost names oneof variants.
fn upper_camel(snake: &str) -> String {
    snake
        .split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            match c.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}
