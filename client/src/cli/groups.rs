//! `group create|info|add|remove|role|leave|update`.

use clap::{Subcommand, ValueEnum};
use serde_json::json;
use starling_client::{Client, ClientError, json as sj, v1};

use super::messaging;
use super::out::Out;

/// A role on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Role {
    /// May send, read and leave.
    Member,
    /// May also change members, roles and settings.
    Admin,
}

impl From<Role> for v1::GroupRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Member => v1::GroupRole::Member,
            Role::Admin => v1::GroupRole::Admin,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCmd {
    /// Create a group; you become its first admin.
    Create {
        /// The group's name.
        #[arg(long)]
        name: String,
        /// Members besides you: user ids or +phones, comma-separated.
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
    },
    /// Show a group: name, settings, members and roles.
    Info {
        /// The group: its conversation id (or group:<id>).
        #[arg(long)]
        group: String,
    },
    /// Add members (admins only).
    Add {
        /// The group: its conversation id (or group:<id>).
        #[arg(long)]
        group: String,
        /// User ids or +phones, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        users: Vec<String>,
    },
    /// Remove members (admins only).
    Remove {
        /// The group: its conversation id (or group:<id>).
        #[arg(long)]
        group: String,
        /// User ids or +phones, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        users: Vec<String>,
    },
    /// Change a member's role (admins only).
    Role {
        /// The group: its conversation id (or group:<id>).
        #[arg(long)]
        group: String,
        /// The member: a user id or +phone.
        #[arg(long)]
        user: String,
        /// The new role.
        #[arg(long, value_enum)]
        role: Role,
    },
    /// Leave a group (the last admin must make someone else admin first).
    Leave {
        /// The group: its conversation id (or group:<id>).
        #[arg(long)]
        group: String,
    },
    /// Change a group's name or who may send (admins only).
    Update {
        /// The group: its conversation id (or group:<id>).
        #[arg(long)]
        group: String,
        /// The new name.
        #[arg(long, required_unless_present = "only_admins_send")]
        name: Option<String>,
        /// Whether only admins may send.
        #[arg(long, value_name = "true|false")]
        only_admins_send: Option<bool>,
    },
}

/// `group:N`, `conv:N` or `N` → conversation N.
pub(crate) fn group_id(s: &str) -> Result<u64, ClientError> {
    let id = s
        .strip_prefix("group:")
        .or_else(|| s.strip_prefix("conv:"))
        .unwrap_or(s);
    id.parse()
        .ok()
        .filter(|id| *id != 0)
        .ok_or_else(|| ClientError::InvalidArgument(format!("{s:?} is not a group id")))
}

/// Runs a group command and prints its result.
pub(crate) async fn run(out: &Out, client: &Client, cmd: GroupCmd) -> Result<(), ClientError> {
    let info = match cmd {
        GroupCmd::Create { name, members } => {
            let members = messaging::users(client, &members).await?;
            client.create_group(&name, &members).await?
        }
        GroupCmd::Info { group } => client.group_info(group_id(&group)?).await?,
        GroupCmd::Add { group, users: u } => {
            let conv = group_id(&group)?;
            let u = messaging::users(client, &u).await?;
            client.add_group_members(conv, &u).await?
        }
        GroupCmd::Remove { group, users: u } => {
            let conv = group_id(&group)?;
            let u = messaging::users(client, &u).await?;
            client.remove_group_members(conv, &u).await?
        }
        GroupCmd::Role { group, user, role } => {
            let conv = group_id(&group)?;
            let user = client.resolve_user(&user).await?;
            client.set_group_role(conv, user, role.into()).await?
        }
        GroupCmd::Leave { group } => {
            let conv = group_id(&group)?;
            client.leave_group(conv).await?;
            out.print(&json!({ "type": "left_group", "conversation_id": conv }));
            return Ok(());
        }
        GroupCmd::Update {
            group,
            name,
            only_admins_send,
        } => {
            let update = v1::UpdateGroup {
                conversation_id: group_id(&group)?,
                name,
                only_admins_send,
                ..v1::UpdateGroup::default()
            };
            client.update_group(update).await?
        }
    };
    out.print(&sj::group(&info));
    Ok(())
}
