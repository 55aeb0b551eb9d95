"""The Kong-facing side: the plugin shell bound to the PDK, the MessagePack-RPC server Kong talks to, the plugin's
Kong schema, hand-off tickets and the takeover on `kong reload`.
"""
