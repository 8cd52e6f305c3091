"""I-BERT's integer operators as TIR PrimFuncs, and the graph-level builders that call them.

The design card says "Relay"; Relay was removed in TVM 0.20 and TVM 0.27 has only its successor,
Relax, so these are Relax `call_tir` targets. Every kernel is written in TE (tensor expressions)
and lowered to a TIR PrimFunc with `te.create_prim_func`; schedules live in `schedules/`.
"""
