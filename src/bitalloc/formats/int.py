"""(stub: being written)"""
