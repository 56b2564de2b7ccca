"""What the tests share: one package, so that no test file imports another.

* ``oracle``: the data plane's documented rules as a model (fuzzer and tests).
* ``fuzz_gen``: seeded random and mutated frames.
* ``packets``: the packet tables' config, frame builders and expected backends.
* ``e2e``: running ``fastlb`` in a namespace lab and the ``attached()`` context.
* ``bgp``, ``l7``, ``configs``: configs the BGP, L7 and controller tests share.
"""
