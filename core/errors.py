"""Exceptions that carry the CLI's exit status.

Every refusal the user can fix is a :class:`UsageError` (exit 2); a run that started and
could not produce or verify an artifact is an :class:`ExportError` (exit 1). A third-party
plugin that misbehaves is wrapped in :class:`PluginError`, which names the plugin and hook.
"""

from __future__ import annotations


class SoraExportError(Exception):
    """Base class; ``exit_code`` is what the CLI returns for it."""

    exit_code = 1


class UsageError(SoraExportError):
    """Bad input the user can fix: unknown plugin, bad profile, bad weights, busy output."""

    exit_code = 2


class ExportError(SoraExportError):
    """An export or verification stage failed."""

    exit_code = 1


class PluginError(SoraExportError):
    """A plugin raised or returned something invalid; names the plugin and the hook."""

    exit_code = 1

    def __init__(self, plugin: str, hook: str, message: str) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin {plugin!r} failed in hook {hook!r}: {message}")
