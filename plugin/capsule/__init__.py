"""Capsule: end-to-end encrypted, signed encapsulated messages for slixmpp.

Enable it in a bot with one line::

    bot.register_plugin("capsule", {"profile": "bot.capsule", "pin": pin}, module=capsule)
"""

from slixmpp.plugins.base import register_plugin

from capsule.plugin import CapsuleFailure, CapsuleInfo, XEP_Capsule, capsule_info

register_plugin(XEP_Capsule)

__all__ = ["CapsuleFailure", "CapsuleInfo", "XEP_Capsule", "capsule_info"]
