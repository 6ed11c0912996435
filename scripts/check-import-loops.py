#!/usr/bin/env python3
"""Fails when two source files of a crate import each other, directly or in a cycle (imports
of a parent module by its children do not count). Usage: scripts/check-import-loops.py [ROOT]"""
import os,re,sys
root=sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
def modpath(crate_src, f):
    rel=os.path.relpath(f,crate_src)[:-3].split(os.sep)
    if rel[-1] in ('mod','lib','main'): rel=rel[:-1]
    return tuple(rel)
files={}
for crate in ['shared','engine','coordinator','worker','tests']:
    src=os.path.join(root,crate,'src')
    for d,_,fs in os.walk(src):
        for x in fs:
            if x.endswith('.rs'):
                f=os.path.join(d,x)
                if x=='main.rs' and d==src: continue
                files[(crate,modpath(src,f))]=f
mods=set(files)
def resolve(crate,path):
    # longest prefix that is a module file
    for n in range(len(path),-1,-1):
        if (crate,tuple(path[:n])) in mods: return (crate,tuple(path[:n]))
    return None
edges={}
for (crate,mp),f in files.items():
    src=open(f).read()
    # strip test modules crudely
    i=src.find('#[cfg(test)]')
    if i>=0: src=src[:i]
    src=re.sub(r'//[^\n]*','',src)
    tgt=set()
    for m in re.finditer(r'\b((?:super::)+|crate::)([A-Za-z_][A-Za-z0-9_:]*)',src):
        pre,rest=m.group(1),m.group(2)
        parts=[p for p in rest.split('::') if p]
        if pre=='crate::': base=[]
        else:
            k=pre.count('super::')
            # file module path: for mod.rs the module itself
            base=list(mp)[:len(mp)-k] if len(mp)>=k else []
        r=resolve(crate,base+parts)
        if r and r!=(crate,mp):
            # ignore ancestors (parent modules)
            if r[1]==mp[:len(r[1])]: continue
            tgt.add(r)
    edges[(crate,mp)]=tgt
# find 2-cycles and longer via Tarjan
idx={};low={};st=[];on=set();out=[];c=[0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in edges.get(v,()):
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: out.append(comp)
for v in list(edges):
    if v not in idx: sc(v)
for comp in out:
    print('CYCLE:',[c+'::'+'::'.join(m) for c,m in comp])
    for a in comp:
        for b in edges[a]:
            if b in comp: print('   ',a[0]+'::'+'::'.join(a[1]),'->','::'.join(b[1]))
print(len(out),'cycles')
sys.exit(1 if out else 0)
