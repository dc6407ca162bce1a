"""Assimilation methods: OI, MAP/BLUE, 4D-Var, neural incremental DA, 4DVarNet, ensembles."""
