"""The XML namespaces and PEP node Capsule v0 puts on the wire (used by the stanzas)."""

NAMESPACE = "urn:capsule:0"
CERTS_NODE = "urn:capsule:certs:0"
SCE_NAMESPACE = "urn:xmpp:sce:1"
RECEIPT_NAMESPACE = "urn:capsule:receipt:0"  # the proof beside a XEP-0184 receipt (any version)
