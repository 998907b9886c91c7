from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Api(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    API_UNSPECIFIED: _ClassVar[Api]
    OPENAI_COMPLETIONS: _ClassVar[Api]
    OPENAI_CHAT: _ClassVar[Api]
    KSERVE_V2: _ClassVar[Api]
    IN_PROCESS: _ClassVar[Api]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_ALLOW_MODIFIED: _ClassVar[Decision]
    DECISION_THROTTLE: _ClassVar[Decision]
    DECISION_DENY: _ClassVar[Decision]

class LogprobsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGPROBS_MODE_UNSPECIFIED: _ClassVar[LogprobsMode]
    LOGPROBS_MODE_RAW: _ClassVar[LogprobsMode]
    LOGPROBS_MODE_PROCESSED: _ClassVar[LogprobsMode]

class OutputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_KIND_UNSPECIFIED: _ClassVar[OutputKind]
    OUTPUT_KIND_TOP_LOGPROBS: _ClassVar[OutputKind]
    OUTPUT_KIND_PROBABILITIES: _ClassVar[OutputKind]

class SettleStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SETTLE_STATUS_UNSPECIFIED: _ClassVar[SettleStatus]
    SETTLE_STATUS_OK: _ClassVar[SettleStatus]
    SETTLE_STATUS_CLIENT_ABORT: _ClassVar[SettleStatus]
    SETTLE_STATUS_UPSTREAM_ERROR: _ClassVar[SettleStatus]
API_UNSPECIFIED: Api
OPENAI_COMPLETIONS: Api
OPENAI_CHAT: Api
KSERVE_V2: Api
IN_PROCESS: Api
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_ALLOW_MODIFIED: Decision
DECISION_THROTTLE: Decision
DECISION_DENY: Decision
LOGPROBS_MODE_UNSPECIFIED: LogprobsMode
LOGPROBS_MODE_RAW: LogprobsMode
LOGPROBS_MODE_PROCESSED: LogprobsMode
OUTPUT_KIND_UNSPECIFIED: OutputKind
OUTPUT_KIND_TOP_LOGPROBS: OutputKind
OUTPUT_KIND_PROBABILITIES: OutputKind
SETTLE_STATUS_UNSPECIFIED: SettleStatus
SETTLE_STATUS_OK: SettleStatus
SETTLE_STATUS_CLIENT_ABORT: SettleStatus
SETTLE_STATUS_UPSTREAM_ERROR: SettleStatus

class ClientIdentity(_message.Message):
    __slots__ = ("client_id", "tenant", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    tenant: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, client_id: _Optional[str] = ..., tenant: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "chat", "token_ids", "tensor_bytes")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatMessages
    token_ids: TokenIds
    tensor_bytes: bytes
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., tensor_bytes: _Optional[bytes] = ...) -> None: ...

class SignedProfile(_message.Message):
    __slots__ = ("payload", "signature", "key_id", "expires_at_ms")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    signature: bytes
    key_id: str
    expires_at_ms: int
    def __init__(self, payload: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "logprob_values")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_VALUES_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    logprob_values: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., logprob_values: _Optional[int] = ...) -> None: ...

class AdmitRequest(_message.Message):
    __slots__ = ("request_id", "identity", "model", "api", "prompt", "prompt_tokens", "max_tokens", "n", "temperature", "seed", "stream", "logprobs", "top_logprobs", "logit_bias_entries", "prompt_logprobs", "echo", "raw_logits_outputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    RAW_LOGITS_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    identity: ClientIdentity
    model: str
    api: Api
    prompt: Prompt
    prompt_tokens: int
    max_tokens: int
    n: int
    temperature: float
    seed: int
    stream: bool
    logprobs: bool
    top_logprobs: int
    logit_bias_entries: int
    prompt_logprobs: bool
    echo: bool
    raw_logits_outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., identity: _Optional[_Union[ClientIdentity, _Mapping]] = ..., model: _Optional[str] = ..., api: _Optional[_Union[Api, str]] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., n: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., stream: _Optional[bool] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., logit_bias_entries: _Optional[int] = ..., prompt_logprobs: _Optional[bool] = ..., echo: _Optional[bool] = ..., raw_logits_outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class Rewrites(_message.Message):
    __slots__ = ("top_logprobs", "max_tokens", "n", "drop_logit_bias", "drop_prompt_logprobs", "drop_echo", "strip_outputs")
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    DROP_LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    DROP_PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DROP_ECHO_FIELD_NUMBER: _ClassVar[int]
    STRIP_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    top_logprobs: int
    max_tokens: int
    n: int
    drop_logit_bias: bool
    drop_prompt_logprobs: bool
    drop_echo: bool
    strip_outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, top_logprobs: _Optional[int] = ..., max_tokens: _Optional[int] = ..., n: _Optional[int] = ..., drop_logit_bias: _Optional[bool] = ..., drop_prompt_logprobs: _Optional[bool] = ..., drop_echo: _Optional[bool] = ..., strip_outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class AdmitResponse(_message.Message):
    __slots__ = ("decision", "shadow", "reason", "reason_code", "retry_after_s", "reservation_id", "rewrites", "context_digest", "profile", "strength")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REWRITES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    shadow: bool
    reason: str
    reason_code: str
    retry_after_s: float
    reservation_id: str
    rewrites: Rewrites
    context_digest: bytes
    profile: SignedProfile
    strength: float
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., shadow: _Optional[bool] = ..., reason: _Optional[str] = ..., reason_code: _Optional[str] = ..., retry_after_s: _Optional[float] = ..., reservation_id: _Optional[str] = ..., rewrites: _Optional[_Union[Rewrites, _Mapping]] = ..., context_digest: _Optional[bytes] = ..., profile: _Optional[_Union[SignedProfile, _Mapping]] = ..., strength: _Optional[float] = ...) -> None: ...

class ProtectRequest(_message.Message):
    __slots__ = ("request_id", "model", "context_digest", "temperature", "logprobs_mode", "kind", "positions", "k", "token_ids", "values", "sampled_token_ids", "sampled_values", "profile", "identity", "position_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_MODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_VALUES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    context_digest: bytes
    temperature: float
    logprobs_mode: LogprobsMode
    kind: OutputKind
    positions: int
    k: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    sampled_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampled_values: _containers.RepeatedScalarFieldContainer[float]
    profile: SignedProfile
    identity: ClientIdentity
    position_offset: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., context_digest: _Optional[bytes] = ..., temperature: _Optional[float] = ..., logprobs_mode: _Optional[_Union[LogprobsMode, str]] = ..., kind: _Optional[_Union[OutputKind, str]] = ..., positions: _Optional[int] = ..., k: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., sampled_token_ids: _Optional[_Iterable[int]] = ..., sampled_values: _Optional[_Iterable[float]] = ..., profile: _Optional[_Union[SignedProfile, _Mapping]] = ..., identity: _Optional[_Union[ClientIdentity, _Mapping]] = ..., position_offset: _Optional[int] = ...) -> None: ...

class ProtectResponse(_message.Message):
    __slots__ = ("positions", "k", "token_ids", "values", "sampled_token_ids", "sampled_values", "applied")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_VALUES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    positions: int
    k: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    sampled_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampled_values: _containers.RepeatedScalarFieldContainer[float]
    applied: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, positions: _Optional[int] = ..., k: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., sampled_token_ids: _Optional[_Iterable[int]] = ..., sampled_values: _Optional[_Iterable[float]] = ..., applied: _Optional[_Iterable[str]] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("request_id", "reservation_id", "identity", "model", "status", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reservation_id: str
    identity: ClientIdentity
    model: str
    status: SettleStatus
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., identity: _Optional[_Union[ClientIdentity, _Mapping]] = ..., model: _Optional[str] = ..., status: _Optional[_Union[SettleStatus, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("already_settled", "charged")
    ALREADY_SETTLED_FIELD_NUMBER: _ClassVar[int]
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    already_settled: bool
    charged: Usage
    def __init__(self, already_settled: _Optional[bool] = ..., charged: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class TokenSequence(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("key_id", "tokens_scored", "z", "log10_p", "detected", "scheme")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SCORED_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    LOG10_P_FIELD_NUMBER: _ClassVar[int]
    DETECTED_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tokens_scored: int
    z: float
    log10_p: float
    detected: bool
    scheme: str
    def __init__(self, key_id: _Optional[str] = ..., tokens_scored: _Optional[int] = ..., z: _Optional[float] = ..., log10_p: _Optional[float] = ..., detected: _Optional[bool] = ..., scheme: _Optional[str] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("sequences", "key_ids", "model", "scheme")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    model: str
    scheme: str
    def __init__(self, sequences: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ..., key_ids: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., scheme: _Optional[str] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("results", "combined")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COMBINED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Detection]
    combined: Detection
    def __init__(self, results: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., combined: _Optional[_Union[Detection, _Mapping]] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("client_id", "tenant", "model")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    tenant: str
    model: str
    def __init__(self, client_id: _Optional[str] = ..., tenant: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class LimitStatus(_message.Message):
    __slots__ = ("name", "unit", "scope", "limit", "used", "reserved", "remaining", "reset_in_s", "shadow")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_IN_S_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    unit: str
    scope: str
    limit: int
    used: int
    reserved: int
    remaining: int
    reset_in_s: float
    shadow: bool
    def __init__(self, name: _Optional[str] = ..., unit: _Optional[str] = ..., scope: _Optional[str] = ..., limit: _Optional[int] = ..., used: _Optional[int] = ..., reserved: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_in_s: _Optional[float] = ..., shadow: _Optional[bool] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("limits", "suspicion_score", "signals", "strength", "tier")
    class SignalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SUSPICION_SCORE_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    limits: _containers.RepeatedCompositeFieldContainer[LimitStatus]
    suspicion_score: float
    signals: _containers.ScalarMap[str, float]
    strength: float
    tier: str
    def __init__(self, limits: _Optional[_Iterable[_Union[LimitStatus, _Mapping]]] = ..., suspicion_score: _Optional[float] = ..., signals: _Optional[_Mapping[str, float]] = ..., strength: _Optional[float] = ..., tier: _Optional[str] = ...) -> None: ...
