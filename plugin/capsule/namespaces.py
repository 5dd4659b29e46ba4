"""The XML namespaces and PEP nodes Capsule puts on the wire (used by the stanzas)."""

NAMESPACE = "urn:capsule:0"
CERTS_NODE = "urn:capsule:certs:0"
SCE_NAMESPACE = "urn:xmpp:sce:1"
V1_NAMESPACE = "urn:capsule:1"  # wire format v1
SESSIONS_NODE = "urn:capsule:sessions:1"  # v1 session records
RECEIPT_NAMESPACE = "urn:capsule:receipt:0"  # the proof beside a XEP-0184 receipt (any version)
