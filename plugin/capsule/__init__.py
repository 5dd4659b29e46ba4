"""Capsule: end-to-end encrypted, signed encapsulated messages for slixmpp."""
