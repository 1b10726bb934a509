"""Drop-in compatibility package for the reference ``mooncake`` wheel.

``from mooncake.engine import TransferEngine`` works unchanged, with the
reference's names, positional signatures and integer return codes.  This
package only adapts; the implementation lives in :mod:`pymooncake`.
"""
