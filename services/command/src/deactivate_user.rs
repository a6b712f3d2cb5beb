//! DeactivateUser: an administrator stops a user (permission `kiroku:admin`), with a reason that is the person's
//! data (sealed). Idempotent by the calling service's request id.

use kiroku_domain::{UserCommand, UserId};

use crate::commands::{Call, Commands, rpc};
use crate::error::CommandError;
use crate::pipeline::{Answer, Order, Prepared, Target};

impl Commands {
    pub(crate) async fn deactivate_user(
        &self,
        user_id: UserId,
        reason: String,
        expected_version: u64,
        call: &Call,
    ) -> Result<Answer, CommandError> {
        let order = Order {
            rpc: rpc::DEACTIVATE_USER,
            who: Commands::service(call),
            content: vec![user_id.to_string(), reason.clone(), expected_version.to_string()],
            target: Target::User(user_id),
            expected_version,
        };
        let command = UserCommand::Deactivate { reason, now: call.received_at };
        self.pipeline()
            .change_user(call, order, command, |_, _, command| async { Ok(Prepared { command, erasure: None }) })
            .await
    }
}
