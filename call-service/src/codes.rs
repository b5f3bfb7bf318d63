//! Result codes as plain numbers, taken from the one definition in
//! `proto/videocall/v1/types.proto` (`ResultCode`).

use videocall_proto::v1::ResultCode;

pub const OK: u32 = ResultCode::Ok as u32;
pub const CANCELLED: u32 = ResultCode::Cancelled as u32;
pub const OFFLINE: u32 = ResultCode::Offline as u32;
pub const BUSY: u32 = ResultCode::Busy as u32;
pub const REJECTED: u32 = ResultCode::Rejected as u32;
pub const NO_ANSWER: u32 = ResultCode::NoAnswer as u32;
pub const CONNECTION_LOST: u32 = ResultCode::ConnectionLost as u32;
pub const NOT_IN_CALL: u32 = ResultCode::NotInCall as u32;
pub const ALREADY_IN_CALL: u32 = ResultCode::AlreadyInCall as u32;
pub const BUSINESS_UNAVAILABLE: u32 = ResultCode::BusinessUnavailable as u32;
pub const ANSWERED_ELSEWHERE: u32 = ResultCode::AnsweredElsewhere as u32;
pub const INVALID_ARGUMENT: u32 = ResultCode::InvalidArgument as u32;
pub const RATE_LIMITED: u32 = ResultCode::RateLimited as u32;
pub const NOT_ALLOWED: u32 = ResultCode::NotAllowed as u32;
pub const TERMINATED: u32 = ResultCode::Terminated as u32;
pub const OVERLOADED: u32 = ResultCode::Overloaded as u32;
pub const STORE_UNAVAILABLE: u32 = ResultCode::StoreUnavailable as u32;
pub const TOKEN_REFUSED: u32 = ResultCode::TokenRefused as u32;

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's numbers must never move.
    #[test]
    fn contract_numbers() {
        assert_eq!(
            [
                OK,
                CANCELLED,
                OFFLINE,
                BUSY,
                REJECTED,
                NO_ANSWER,
                CONNECTION_LOST,
                NOT_IN_CALL,
                ALREADY_IN_CALL
            ],
            [
                0, 100101, 100102, 100103, 100104, 100105, 100106, 100107, 440
            ]
        );
        let added = [
            BUSINESS_UNAVAILABLE,
            ANSWERED_ELSEWHERE,
            INVALID_ARGUMENT,
            RATE_LIMITED,
            NOT_ALLOWED,
            TERMINATED,
            OVERLOADED,
            STORE_UNAVAILABLE,
            TOKEN_REFUSED,
        ];
        assert!(added.iter().all(|c| (100201..=100299).contains(c)));
    }
}
