"""Envoy ext_proc messages as protobuf builds them: what the servicer's hand-written bytes are held to."""

from __future__ import annotations

from server_plugins.envoy._proto import ext_proc_pb2 as pb
from server_plugins.envoy.ext_proc import REQUEST_BODY


def protobuf_body_response(which: int, data: bytes, set_headers: tuple[tuple[str, str], ...],
                           remove: tuple[str, ...]) -> pb.ProcessingResponse:
    """The ProcessingResponse that ``body_response`` writes: the request (``REQUEST_BODY``) or response body
    replaced with ``data`` (cleared when empty), these headers set (OVERWRITE_IF_EXISTS_OR_ADD, value as
    raw_value) and these removed."""
    over = pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    common = pb.CommonResponse(body_mutation=pb.BodyMutation(body=data) if data else pb.BodyMutation(clear_body=True))
    if set_headers or remove:
        common.header_mutation.CopyFrom(pb.HeaderMutation(
            set_headers=[pb.HeaderValueOption(header=pb.HeaderValue(key=k, raw_value=v.encode("latin-1")),
                                              append_action=over) for k, v in set_headers],
            remove_headers=list(remove)))
    body = pb.BodyResponse(response=common)
    return pb.ProcessingResponse(**{"request_body" if which == REQUEST_BODY else "response_body": body})
