"""qtap-devtools: eBPF HTTP(S) capture streamed as Qpoint Qtap DevTools events."""

__version__ = "0.1.0"
