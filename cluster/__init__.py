"""Everything that needs more than one node: routing (Raft), discovery, transport, takeover.

`node` never imports this package; the ``shoal`` entry point attaches it to a node.
"""
